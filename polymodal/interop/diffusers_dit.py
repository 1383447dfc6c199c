"""diffusers `DiTTransformer2DModel` folders <-> `DiTConfig` and `DiT` weights.

A folder holds config.json (`_class_name: "DiTTransformer2DModel"`) and
diffusion_pytorch_model.safetensors. Config keys and defaults follow diffusers'
`DiTTransformer2DModel.__init__`; weight names follow its modules (`BasicTransformerBlock` with
`AdaLayerNormZero`, `FeedForward`, `PatchEmbed`).

diffusers gives every block its own copy of the timestep/class embedder
(`transformer_blocks.{i}.norm1.emb`; the final layer reads block 0's). Checkpoints converted from
the DiT paper hold the same tensors in each copy; our DiT keeps one, so import reads block 0's
and refuses a file whose copies differ, and export writes the copy into every block.
"""
from __future__ import annotations

import torch

from polymodal.checkpoint import CheckpointMismatchError
from polymodal.generators.dit import DiT, DiTConfig
from polymodal.interop.converters import build_config
from polymodal.interop.namemap import NameMap, shapes_of, state_from_foreign

CLASS_NAME = "DiTTransformer2DModel"
# diffusers' DiTTransformer2DModel defaults, for keys a config.json omits.
_DEFAULTS = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=None, num_layers=28,
                 dropout=0.0, attention_bias=True, sample_size=32, patch_size=2, activation_fn="gelu-approximate",
                 num_embeds_ada_norm=1000, norm_type="ada_norm_zero", norm_elementwise_affine=False, norm_eps=1e-5)
_ACT_FROM_DIFFUSERS = {"gelu-approximate": "gelu_tanh", "gelu": "gelu"}
_ACT_TO_DIFFUSERS = {ours: theirs for theirs, ours in _ACT_FROM_DIFFUSERS.items()}
# DiTConfig fields whose config.json key differs (for error messages).
_KEYS = {"num_heads": "num_attention_heads", "hidden_size": "num_attention_heads * attention_head_dim",
         "act": "activation_fn", "num_classes": "num_embeds_ada_norm", "mlp_norm_eps": "norm_eps",
         "qkv_bias": "attention_bias", "learn_sigma": "out_channels"}
# What diffusers fixes in code: adaLN and final norms at eps 1e-6, a 256-wide timestep frequency
# embedding with downscale_freq_shift 1, a 4x MLP.
_FIXED_NORM_EPS, _FIXED_FREQ_DIM, _FIXED_FREQ_SHIFT, _MLP_MULT = 1e-6, 256, 1.0, 4

_EMBEDDER = "transformer_blocks.{}.norm1.emb."
_EMBEDDER_NAMES = {  # per-block embedder tensors (diffusers, after the prefix) -> our shared ones
    "timestep_embedder.linear_1.weight": "t_embedder.fc1.weight",
    "timestep_embedder.linear_1.bias": "t_embedder.fc1.bias",
    "timestep_embedder.linear_2.weight": "t_embedder.fc2.weight",
    "timestep_embedder.linear_2.bias": "t_embedder.fc2.bias",
    "class_embedder.embedding_table.weight": "class_embedding.weight",
}
DIFFUSERS_DIT_NAMES = NameMap([
    ("pos_embed.proj", "patch_embed.proj"),
    ("transformer_blocks.{}.norm1.linear", "blocks.{}.modulation"),
    ("transformer_blocks.{}.attn1.to_q", "blocks.{}.attn.q_proj"),
    ("transformer_blocks.{}.attn1.to_k", "blocks.{}.attn.k_proj"),
    ("transformer_blocks.{}.attn1.to_v", "blocks.{}.attn.v_proj"),
    ("transformer_blocks.{}.attn1.to_out.0", "blocks.{}.attn.o_proj"),
    ("transformer_blocks.{}.ff.net.0.proj", "blocks.{}.mlp.fc1"),
    ("transformer_blocks.{}.ff.net.2", "blocks.{}.mlp.fc2"),
    ("proj_out_1", "final_modulation"),
    ("proj_out_2", "final_proj"),
])


def dit_config_from_diffusers(cfg: dict, source: str = "config.json") -> DiTConfig:
    """Translate a diffusers DiTTransformer2DModel config.json dict into a `DiTConfig`.

    Raises ValueError naming the keys whose values our DiT does not implement.
    """
    v = {**_DEFAULTS, **{k: val for k, val in cfg.items() if k in _DEFAULTS and val is not None}}
    refused = []
    if v["norm_type"] != "ada_norm_zero":
        refused.append(f"norm_type={v['norm_type']!r} (only 'ada_norm_zero')")
    if v["norm_elementwise_affine"]:
        refused.append("norm_elementwise_affine=true (the MLP norm has no affine weights here)")
    if v["dropout"]:
        refused.append(f"dropout={v['dropout']} (no dropout here)")
    if v["activation_fn"] not in _ACT_FROM_DIFFUSERS:
        refused.append(f"activation_fn={v['activation_fn']!r} (known: {sorted(_ACT_FROM_DIFFUSERS)})")
    out_channels = v["out_channels"] if v["out_channels"] is not None else v["in_channels"]
    if out_channels not in (v["in_channels"], 2 * v["in_channels"]):
        refused.append(f"out_channels={out_channels} (in_channels {v['in_channels']} or twice that)")
    if not v["num_embeds_ada_norm"]:
        refused.append(f"num_embeds_ada_norm={v['num_embeds_ada_norm']!r} (a class count)")
    if refused:
        raise ValueError(f"{source}: {CLASS_NAME} settings our DiT does not implement: {'; '.join(refused)}")
    hidden = v["num_attention_heads"] * v["attention_head_dim"]
    fields = dict(sample_size=v["sample_size"], patch_size=v["patch_size"], in_channels=v["in_channels"],
                  hidden_size=hidden, num_layers=v["num_layers"], num_heads=v["num_attention_heads"],
                  intermediate_size=_MLP_MULT * hidden, act=_ACT_FROM_DIFFUSERS[v["activation_fn"]],
                  qkv_bias=v["attention_bias"], learn_sigma=out_channels != v["in_channels"],
                  num_classes=v["num_embeds_ada_norm"], norm_eps=_FIXED_NORM_EPS, mlp_norm_eps=v["norm_eps"],
                  freq_dim=_FIXED_FREQ_DIM, freq_shift=_FIXED_FREQ_SHIFT)
    return build_config(DiTConfig, fields, source, _KEYS)


def diffusers_config_from_dit(config: DiTConfig) -> dict:
    """A diffusers DiTTransformer2DModel config.json dict for `config`.

    Raises ValueError naming every field diffusers' DiT cannot express (cross-attention, pooled
    text, no class labels, a non-4x MLP, other fixed constants).
    """
    c = config
    refused = []
    if c.cross_attention_dim:
        refused.append(f"cross_attention_dim={c.cross_attention_dim} (no cross-attention)")
    if c.pooled_dim:
        refused.append(f"pooled_dim={c.pooled_dim} (no pooled-text conditioning)")
    if not c.num_classes:
        refused.append("num_classes=0 (class labels are required)")
    if c.intermediate_size != _MLP_MULT * c.hidden_size:
        refused.append(f"intermediate_size={c.intermediate_size} (fixed at 4 * hidden_size = {4 * c.hidden_size})")
    if c.act not in _ACT_TO_DIFFUSERS:
        refused.append(f"act={c.act!r} (known: {sorted(_ACT_TO_DIFFUSERS)})")
    for name, fixed in (("norm_eps", _FIXED_NORM_EPS), ("freq_dim", _FIXED_FREQ_DIM), ("freq_shift", _FIXED_FREQ_SHIFT)):
        if getattr(c, name) != fixed:
            refused.append(f"{name}={getattr(c, name)} (fixed at {fixed})")
    if refused:
        raise ValueError(f"DiTConfig fields {CLASS_NAME} cannot express: {'; '.join(refused)}")
    return {
        "_class_name": CLASS_NAME,
        "num_attention_heads": c.num_heads,
        "attention_head_dim": c.hidden_size // c.num_heads,
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "num_layers": c.num_layers,
        "dropout": 0.0,
        "attention_bias": c.qkv_bias,
        "sample_size": c.sample_size,
        "patch_size": c.patch_size,
        "activation_fn": _ACT_TO_DIFFUSERS[c.act],
        "num_embeds_ada_norm": c.num_classes,
        "upcast_attention": False,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "norm_eps": c.mlp_norm_eps,
    }


def dit_state_to_diffusers(state: dict[str, torch.Tensor], config: DiTConfig) -> dict[str, torch.Tensor]:
    """Rename a DiT state dict to diffusers names, copying the shared embedder into every block."""
    return _to_diffusers(state, config, copy=True)


def _to_diffusers(state: dict[str, torch.Tensor], config: DiTConfig, copy: bool) -> dict[str, torch.Tensor]:
    """Diffusers names for `state`; the embedder of blocks 1.. is a clone with `copy` (safetensors
    refuses to write tensors that share memory), else the same tensor (enough for a shape check)."""
    out = {}
    shared = {ours: theirs for theirs, ours in _EMBEDDER_NAMES.items()}
    for name, tensor in state.items():
        if name in shared:
            for i in range(config.num_layers):
                out[_EMBEDDER.format(i) + shared[name]] = tensor.clone() if copy and i else tensor
            continue
        foreign = DIFFUSERS_DIT_NAMES.to_foreign(name)
        if foreign is None:
            raise KeyError(f"DiT tensor {name!r} has no {CLASS_NAME} name")
        out[foreign] = tensor
    return out


def dit_state_from_diffusers(tensors: dict[str, torch.Tensor], model: DiT, source: str) -> dict[str, torch.Tensor]:
    """Our DiT state dict from a diffusers DiTTransformer2DModel's tensors.

    Raises `CheckpointMismatchError` naming the tensors that are missing, unexpected or
    mis-shaped, or a block whose embedder copy differs from block 0's (only checked on real
    tensors: the first pass runs on meta stand-ins).
    """
    first = _EMBEDDER.format(0)

    def rename(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = name.split(".")
        if parts[0] == "transformer_blocks" and parts[2:4] == ["norm1", "emb"]:
            key = ".".join(parts[4:])
            if parts[1] == "0":
                return {_EMBEDDER_NAMES[key]: tensor}
            reference = tensors[first + key]
            if not tensor.is_meta and not torch.equal(tensor, reference):
                raise CheckpointMismatchError(
                    f"{source}: {name} differs from {first + key}; our DiT shares one timestep/class embedder "
                    "across blocks (as the DiT paper does) and cannot hold per-block copies")
            return {}
        return {DIFFUSERS_DIT_NAMES.to_ours(name): tensor}

    expected = shapes_of(_to_diffusers(model.state_dict(), model.config, copy=False))
    return state_from_foreign(tensors, expected, source, rename)
