"""The one way a recipe runs: `polymodal train CONFIG.yaml [key=value ...]`.

A recipe (`polymodal.models.registry.Recipe`, declared by its family) contributes a config
dataclass with a `train: TrainConfig` field and a setup function `config -> TrainingJob`: the
model, the batches, the objective and whatever the run needs besides (optimizers, extra state,
callbacks, what goes into the final checkpoint). This module does the rest, the same way for
every family:

1. reads and validates the config (unknown keys and out-of-bounds values are errors);
2. claims `train.out_dir`: a folder holding anything but this recipe's own earlier run is
   refused unless `train.overwrite=true`, and an earlier run is continued only with
   `train.resume=true` (`polymodal.outputs`);
3. seeds every RNG from `train.seed` *before* the model is built, so two runs of one config
   are identical from step 1;
4. trains (`polymodal.train.train`), then writes one output layout:
       DIR/final/          the inference checkpoint `polymodal.load` reads (merged LoRA, EMA weights)
       DIR/checkpoints/    resumable training state, step by step
       DIR/metrics.jsonl   DIR/loss.png   DIR/recipe.yaml (the resolved config)

Under torchrun (or with `train.parallel.strategy` ddp/fsdp) every rank runs this same function:
`polymodal.distributed.session` shards the data, parallelizes the model and writes sharded
checkpoints; rank 0 alone claims the folder and writes the files above.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch.nn as nn
import yaml

from polymodal.atomic import write_text_atomic
from polymodal.config import config_to_yaml, load_config
from polymodal.distributed.session import start_session
from polymodal.errors import ConfigError, DestinationExistsError
from polymodal.models.registry import Recipe, resolve
from polymodal.outputs import Manifest, claim_folder, read_manifest
from polymodal.train.loop import StepContext, TrainResult, seed_everything, train

WRITER = "train"
FINAL = "final"
STANDARD_OUTPUTS = ("checkpoints", FINAL, "metrics.jsonl", "loss.png", "recipe.yaml")


@dataclass
class TrainingJob:
    """What a recipe's setup hands the runner.

    model, data, objective, tokenizer, tokens_in_batch, optimizers, state, callbacks, parallelize:
        as `polymodal.train.train` takes them.
    final_model: () -> the module to save as DIR/final (default: `model`): e.g. LoRA merged, or
        the EMA weights copied in.
    final_files(folder): writes extra files into the final checkpoint before it is swapped in.
    after(model, out_dir): reports after training (evaluation, retention), given the final model.
    """

    model: nn.Module
    data: Any
    objective: Callable[[nn.Module, Any], Any]
    tokenizer: Any = None
    tokens_in_batch: Callable[[Any], int] | None = None
    optimizers: Any = None
    state: Mapping[str, Any] = field(default_factory=dict)
    callbacks: Sequence[Callable[[StepContext], None]] = ()
    parallelize: Callable[[nn.Module], nn.Module] | None = None
    final_model: Callable[[], nn.Module] | None = None
    final_files: Callable[[Path], None] | None = None
    after: Callable[[nn.Module, Path | None], None] | None = None


@dataclass
class RecipeResult:
    """A finished recipe run: the final model and tokenizer, the loop's result, and DIR/final."""

    model: nn.Module
    tokenizer: Any
    result: TrainResult
    final: Path | None


def read_recipe_name(path: str | Path) -> str:
    """The `recipe:` key of a recipe YAML, with errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a YAML mapping with a `recipe:` key, got {type(data).__name__}")
    name = data.get("recipe")
    if not isinstance(name, str):
        raise ConfigError(f"{path} has no `recipe:` key naming the recipe to run")
    return name


def load_recipe_config(config_path: str | Path, overrides: Sequence[str] = ()) -> tuple[Any, Recipe]:
    """(validated config, recipe) of the recipe named in `config_path`'s `recipe:` key, with overrides."""
    from polymodal.models.registry import get_recipe

    name = read_recipe_name(config_path)
    try:
        _, recipe = get_recipe(name)
    except KeyError as err:
        raise ConfigError(f"{config_path}: {err.args[0]}") from None
    return load_config(resolve(recipe.config), config_path, overrides), recipe


def run_recipe(config_path: str | Path, overrides: Sequence[str] = ()) -> RecipeResult:
    """Run the recipe named in `config_path`'s `recipe:` key with `key=value` overrides."""
    return run_training(*load_recipe_config(config_path, overrides))


def run_training(config: Any, recipe: Recipe) -> RecipeResult:
    """Claim the output folder, seed, set the job up, train, and write the output layout.

    In a multi-process run every rank returns; only rank 0's result holds the final model and folder."""
    train_config = config.train
    out = Path(train_config.out_dir) if train_config.out_dir else None
    session = start_session(train_config)
    try:
        if out is not None and session.is_main:
            manifest = claim_run_folder(out, train_config.resume, train_config.overwrite)
            for name in (*STANDARD_OUTPUTS, *recipe.outputs):
                manifest.claim(name)
            manifest.save()
        session.barrier()
        seed_everything(train_config.seed)
        job = session.prepare(resolve(recipe.setup)(config))
        result = train(job.model, job.data, job.objective, train_config, optimizers=job.optimizers, state=job.state,
                       parallelize=job.parallelize, callbacks=job.callbacks, tokens_in_batch=job.tokens_in_batch,
                       tokenizer=job.tokenizer, checkpointer=session.checkpointer())
        model = session.final_model(job)
        final = None
        if out is not None and session.is_main:
            from polymodal.checkpoint import save_checkpoint

            final = save_checkpoint(model, out / FINAL, job.tokenizer,
                                    extra={"recipe": config.recipe, "step": result.step}, extra_files=job.final_files)
            write_text_atomic(out / "recipe.yaml", config_to_yaml(config))
        if job.after is not None and session.is_main:
            job.after(model, out)
        session.report()
    finally:
        session.close()
    return RecipeResult(model, job.tokenizer, result, final)


def claim_run_folder(out: Path, resume: bool, overwrite: bool) -> Manifest:
    """The manifest of a training run's output folder (see the module docstring, step 2)."""
    previous = read_manifest(out) if out.is_dir() else None
    ours = (previous is not None and previous.writer == WRITER) or (out / "checkpoints").is_dir()
    if ours and resume:
        return previous if previous is not None else Manifest(out, WRITER)
    if ours and not overwrite:
        raise DestinationExistsError(f"{out} holds an earlier training run; set train.resume=true to continue it, "
                                     "train.overwrite=true to start over, or choose another train.out_dir")
    return claim_folder(out, WRITER, overwrite)
