"""The diffusion process, apart from any network (as in DiT): noise schedules (`schedules`),
prediction types, their conversions and the training loss (`objectives`), samplers (`samplers`)
and classifier-free guidance (`guidance`).

A denoiser is any callable denoiser(x_t (B, C, H, W...), t (B,) float, **cond) -> prediction of
x_t's shape. t is in the units of `process.model_time`: the integer DDPM timestep 0..T-1 as a
float, or num_train_timesteps * t (1000 t) for flow matching.
"""
from polymodal.generators.diffusion.guidance import ClassifierFreeGuidance
from polymodal.generators.diffusion.objectives import (
    Denoiser,
    condition_drop_mask,
    convert_prediction,
    diffusion_loss,
    drop_condition,
    prediction_from,
    x0_and_noise,
)
from polymodal.generators.diffusion.samplers import (
    SAMPLERS,
    NonFiniteSampleError,
    ddim_step,
    ddpm_posterior,
    ddpm_step,
    ddpm_timesteps,
    flow_times,
    sample,
)
from polymodal.generators.diffusion.schedules import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    DiffusionProcess,
    DiffusionSchedule,
    FlowMatchingSchedule,
    gaussian_noise,
    make_betas,
)

__all__ = [
    "BETA_SCHEDULES", "PREDICTION_TYPES", "SAMPLERS", "ClassifierFreeGuidance", "Denoiser", "DiffusionProcess",
    "DiffusionSchedule", "FlowMatchingSchedule", "NonFiniteSampleError", "condition_drop_mask",
    "convert_prediction", "ddim_step", "ddpm_posterior", "ddpm_step", "ddpm_timesteps", "diffusion_loss",
    "drop_condition", "flow_times", "gaussian_noise", "make_betas", "prediction_from", "sample", "x0_and_noise",
]
