"""Validate before you allocate: every config dataclass rejects out-of-bounds values in one line
naming the class and field, real model sizes pass, and a hostile checkpoint config.json fails
at load time before a single layer is built."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import polymodal
from polymodal.backbones import decoder
from polymodal.backbones.decoder import DecoderConfig, DecoderLM
from polymodal.checkpoint import save_checkpoint
from polymodal.cli import main
from polymodal.encoders.bert import BertConfig
from polymodal.encoders.convnet import ConvNetConfig
from polymodal.encoders.efficientnet import EfficientNetConfig
from polymodal.encoders.gridpool import GridPoolConfig
from polymodal.encoders.text import TextEncoderConfig
from polymodal.encoders.vit import ViTConfig
from polymodal.errors import CheckpointError, ConfigError
from polymodal.models.lm import lm_tiny
from polymodal.nn.lora import LoRAConfig
from polymodal.projectors.config import ProjectorConfig
from polymodal.train.loop import TrainConfig

NAN, INF = math.nan, math.inf
LM_RECIPE = Path(__file__).resolve().parents[2] / "configs" / "lm" / "tiny.yaml"
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}

# (config class, keyword arguments over its defaults, text the error must contain: the field at fault)
BAD = [
    (DecoderConfig, dict(num_layers=0), "num_layers"),
    (DecoderConfig, dict(num_layers=-1), "num_layers"),
    (DecoderConfig, dict(num_layers=10 ** 9), "num_layers must be in [1, 1024], got 1000000000"),
    (DecoderConfig, dict(num_layers=2.5), "num_layers must be an integer"),
    (DecoderConfig, dict(num_layers=True), "num_layers must be an integer"),
    (DecoderConfig, dict(num_layers="12"), "num_layers must be an integer"),
    (DecoderConfig, dict(hidden_size=10 ** 8), "hidden_size"),
    (DecoderConfig, dict(hidden_size=0), "hidden_size"),
    (DecoderConfig, dict(vocab_size=0), "vocab_size"),
    (DecoderConfig, dict(vocab_size=2 ** 40), "vocab_size"),
    (DecoderConfig, dict(intermediate_size=10 ** 9), "intermediate_size"),
    (DecoderConfig, dict(num_heads=0), "num_heads"),
    (DecoderConfig, dict(num_heads=4096, num_kv_heads=8), "num_heads"),
    (DecoderConfig, dict(num_kv_heads=3), "must be a multiple of num_kv_heads (3)"),
    (DecoderConfig, dict(num_kv_heads=16), "num_kv_heads"),
    (DecoderConfig, dict(hidden_size=500), "hidden_size (500) must be a multiple of num_heads (8)"),
    (DecoderConfig, dict(head_dim=0), "head_dim"),
    (DecoderConfig, dict(head_dim=10 ** 9), "head_dim"),
    (DecoderConfig, dict(head_dim=63), "head_dim must be even"),
    (DecoderConfig, dict(hidden_size=8, num_heads=8, num_kv_heads=8), "head_dim must be even"),
    (DecoderConfig, dict(rms_norm_eps=NAN), "rms_norm_eps"),
    (DecoderConfig, dict(rms_norm_eps=0.0), "rms_norm_eps"),
    (DecoderConfig, dict(rope_theta=INF), "rope_theta"),
    (DecoderConfig, dict(rope_theta=-1.0), "rope_theta"),
    (DecoderConfig, dict(rope_scaling=[1, 2]), "rope_scaling"),
    (DecoderConfig, dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_scaling type"),
    (DecoderConfig, dict(rope_scaling={"rope_type": "linear"}), "rope_scaling"),
    (DecoderConfig, dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "beta": 1.0}), "rope_scaling"),
    (DecoderConfig, dict(rope_scaling={"type": "linear", "factor": NAN}), "rope_scaling.factor"),
    (DecoderConfig, dict(rope_scaling={**LLAMA3_ROPE, "high_freq_factor": 1.0}), "rope_scaling.high_freq_factor"),
    (DecoderConfig, dict(rope_scaling={**LLAMA3_ROPE, "original_max_position_embeddings": 10 ** 12}),
     "rope_scaling.original_max_position_embeddings"),
    (DecoderConfig, dict(max_position_embeddings=0), "max_position_embeddings"),
    (DecoderConfig, dict(max_position_embeddings=2 ** 40), "max_position_embeddings"),
    (DecoderConfig, dict(bos_token_id=32000), "bos_token_id must be in [0, 31999], got 32000"),
    (DecoderConfig, dict(bos_token_id=-1), "bos_token_id"),
    (DecoderConfig, dict(pad_token_id=10 ** 9), "pad_token_id"),
    (DecoderConfig, dict(eos_token_id=32000), "eos_token_id"),
    (DecoderConfig, dict(eos_token_id=[2, 40000]), "eos_token_id[1]"),
    (ViTConfig, dict(image_size=0), "image_size"),
    (ViTConfig, dict(image_size=10 ** 9), "image_size"),
    (ViTConfig, dict(patch_size=0), "patch_size"),
    (ViTConfig, dict(patch_size=448), "patch_size must be in [1, 224]"),
    (ViTConfig, dict(image_size=16384, patch_size=1), "image_size // patch_size"),
    (ViTConfig, dict(num_channels=0), "num_channels"),
    (ViTConfig, dict(hidden_size=10 ** 8), "hidden_size"),
    (ViTConfig, dict(num_heads=7), "hidden_size (768) must be a multiple of num_heads (7)"),
    (ViTConfig, dict(num_layers=10 ** 9), "num_layers"),
    (ViTConfig, dict(intermediate_size=-5), "intermediate_size"),
    (ViTConfig, dict(norm_eps=NAN), "norm_eps"),
    (TextEncoderConfig, dict(vocab_size=0), "vocab_size"),
    (TextEncoderConfig, dict(hidden_size=10 ** 8), "hidden_size"),
    (TextEncoderConfig, dict(num_heads=3), "num_heads (3)"),
    (TextEncoderConfig, dict(num_layers=10 ** 9), "num_layers"),
    (TextEncoderConfig, dict(max_positions=0), "max_positions"),
    (TextEncoderConfig, dict(max_positions=2 ** 40), "max_positions"),
    (TextEncoderConfig, dict(eos_token_id=49408), "eos_token_id must be in [0, 49407]"),
    (TextEncoderConfig, dict(pool="last", eos_token_id=-1), "eos_token_id"),
    (TextEncoderConfig, dict(head=True, projection_size=0), "projection_size"),
    (TextEncoderConfig, dict(norm_eps=INF), "norm_eps"),
    (BertConfig, dict(type_vocab_size=0), "type_vocab_size"),
    (BertConfig, dict(pad_token_id=30522), "pad_token_id"),
    (BertConfig, dict(num_heads=5), "num_heads (5)"),
    (BertConfig, dict(num_layers=10 ** 9), "num_layers"),
    (BertConfig, dict(max_position_embeddings=10 ** 9), "max_position_embeddings"),
    (BertConfig, dict(norm_eps=0.0), "norm_eps"),
    (ConvNetConfig, dict(widths=[]), "widths must have 1 to 1024 items, got 0"),
    (ConvNetConfig, dict(widths=[8] * 2000), "widths"),
    (ConvNetConfig, dict(widths=[32, 60]), "widths[1] (60) must be a multiple of groups (8)"),
    (ConvNetConfig, dict(widths=[0]), "widths[0]"),
    (ConvNetConfig, dict(widths=[8, 10 ** 8]), "widths[1]"),
    (ConvNetConfig, dict(groups=0), "groups"),
    (ConvNetConfig, dict(image_size=10 ** 9), "image_size"),
    (ConvNetConfig, dict(num_channels=0), "num_channels"),
    (GridPoolConfig, dict(filters=0), "GridPoolConfig.filters must be positive"),
    (GridPoolConfig, dict(filters=10 ** 9), "filters"),
    (GridPoolConfig, dict(kernel_size=10 ** 9), "kernel_size"),
    (GridPoolConfig, dict(stride=10 ** 9), "stride"),
    (GridPoolConfig, dict(grid=10 ** 5), "grid"),
    (GridPoolConfig, dict(image_size=10 ** 9), "image_size"),
    (GridPoolConfig, dict(num_channels=NAN), "num_channels"),
    (EfficientNetConfig, dict(stages=[]), "stages"),
    (EfficientNetConfig, dict(stages=[[1, 3, 1, 32, 16]]), "stages[0] must have 6 items"),
    (EfficientNetConfig, dict(stages=[[1, 3, 1, 32, 16, 10 ** 9]]), "stages[0].repeats"),
    (EfficientNetConfig, dict(stages=[[0, 3, 1, 32, 16, 1]]), "stages[0].expand_ratio"),
    (EfficientNetConfig, dict(stages=[[1, 10 ** 9, 1, 32, 16, 1]]), "stages[0].kernel"),
    (EfficientNetConfig, dict(stages=[[1, 3, 1, 32, 16, 1], [6, 3, 2, 24, 24, 1]]), "stages[1].in_channels"),
    (EfficientNetConfig, dict(stages=[[1, 3, 1, 32, 32, 1000], [1, 3, 1, 32, 32, 100]]), "blocks"),
    (EfficientNetConfig, dict(in_channels=0), "in_channels"),
    (EfficientNetConfig, dict(head_channels=10 ** 9), "head_channels"),
    (EfficientNetConfig, dict(num_classes=-1), "num_classes"),
    (EfficientNetConfig, dict(bn_eps=0.0), "bn_eps"),
    (EfficientNetConfig, dict(dropout=1.0), "dropout"),
    (EfficientNetConfig, dict(dropout=NAN), "dropout"),
    (EfficientNetConfig, dict(image_size=0), "image_size"),
    (EfficientNetConfig, dict(pixel_std=(0.5, 0.0, 0.5)), "pixel_std[1]"),
    (EfficientNetConfig, dict(pixel_mean=(0.5, 0.5)), "pixel_mean must have 3 items, got 2"),
    (EfficientNetConfig, dict(pixel_mean=(0.5, INF, 0.5)), "pixel_mean[1]"),
    (ProjectorConfig, dict(mlp_depth=0), "mlp_depth"),
    (ProjectorConfig, dict(mlp_depth=10 ** 9), "mlp_depth"),
    (ProjectorConfig, dict(num_queries=0), "num_queries"),
    (ProjectorConfig, dict(num_queries=10 ** 9), "num_queries"),
    (ProjectorConfig, dict(num_layers=10 ** 9), "num_layers"),
    (ProjectorConfig, dict(num_heads=0), "num_heads"),
    (ProjectorConfig, dict(kind="qformer", hidden_size=30), "hidden_size (30) must be a multiple of num_heads (8)"),
    (ProjectorConfig, dict(hidden_size=10 ** 9), "hidden_size"),
    (ProjectorConfig, dict(intermediate_size=10 ** 9), "intermediate_size"),
    (ProjectorConfig, dict(layer_norm_eps=NAN), "layer_norm_eps"),
    (ProjectorConfig, dict(vision_norm_eps=-1.0), "vision_norm_eps"),
    (ProjectorConfig, dict(cross_attention_every=0), "cross_attention_every"),
    (ProjectorConfig, dict(text_vocab_size=-1), "text_vocab_size"),
    (ProjectorConfig, dict(max_text_positions=0), "max_text_positions"),
    (LoRAConfig, dict(rank=-1), "rank"),
    (LoRAConfig, dict(rank=10 ** 9), "rank"),
    (LoRAConfig, dict(alpha=NAN), "alpha"),
    (LoRAConfig, dict(alpha=-1.0), "alpha"),
    (LoRAConfig, dict(dropout=1.0), "dropout"),
    (TrainConfig, dict(lr=NAN), "lr"),
    (TrainConfig, dict(lr=INF), "lr"),
    (TrainConfig, dict(lr=-1e-3), "lr"),
    (TrainConfig, dict(weight_decay=-0.1), "weight_decay"),
    (TrainConfig, dict(betas=(1.0, 0.95)), "betas[0]"),
    (TrainConfig, dict(betas=(0.9, NAN)), "betas[1]"),
    (TrainConfig, dict(betas=(0.9,)), "betas must have 2 items"),
    (TrainConfig, dict(eps=0.0), "eps"),
    (TrainConfig, dict(max_grad_norm=0.0), "max_grad_norm"),
    (TrainConfig, dict(max_grad_norm=NAN), "max_grad_norm"),
    (TrainConfig, dict(min_lr_ratio=1.5), "min_lr_ratio"),
    (TrainConfig, dict(steps=0), "steps"),
    (TrainConfig, dict(steps=10 ** 12), "steps"),
    (TrainConfig, dict(warmup_steps=10 ** 12), "warmup_steps"),
    (TrainConfig, dict(grad_accum=10 ** 12), "grad_accum"),
    (TrainConfig, dict(seed=-1), "seed"),
    (TrainConfig, dict(seed=2 ** 32), "seed"),
]


@pytest.mark.parametrize(("config_cls", "kwargs", "needle"), BAD,
                         ids=[f"{cls.__name__}-{kwargs}" for cls, kwargs, _ in BAD])
def test_out_of_bounds_values_are_rejected_naming_the_field(config_cls, kwargs, needle):
    with pytest.raises(ConfigError) as err:
        config_cls(**kwargs)
    message = str(err.value)
    assert needle in message and config_cls.__name__ in message, message
    assert "\n" not in message


def test_the_defaults_and_tiny_configs_pass():
    for config_cls in (DecoderConfig, ViTConfig, TextEncoderConfig, BertConfig, ConvNetConfig, GridPoolConfig,
                       EfficientNetConfig, ProjectorConfig, LoRAConfig, TrainConfig):
        config_cls()
    lm_tiny()


def test_real_model_sizes_fit_well_inside_the_bounds():
    # Llama-3.1-405B-Instruct's config.json.
    DecoderConfig(vocab_size=128256, hidden_size=16384, intermediate_size=53248, num_layers=126, num_heads=128,
                  num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE),
                  max_position_embeddings=131072, bos_token_id=128000, eos_token_id=[128001, 128008, 128009])
    # Qwen2-72B: q/k/v biases, a 1M RoPE base.
    DecoderConfig(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_layers=80, num_heads=64,
                  num_kv_heads=8, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
                  attention_bias=True, bos_token_id=151643, eos_token_id=151643)
    # Nemotron-4-340B's width and 4x MLP; Gemma's 256k vocabulary and 256-wide heads.
    DecoderConfig(vocab_size=256000, hidden_size=18432, intermediate_size=73728, num_layers=96, num_heads=96,
                  num_kv_heads=8, max_position_embeddings=4096)
    DecoderConfig(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_layers=28, num_heads=16,
                  num_kv_heads=16, head_dim=256, max_position_embeddings=8192, pad_token_id=0)
    # SigLIP so400m-patch14-384: towers as the HF importer builds them (CLIP's eos id over a 32000 vocabulary).
    ViTConfig(image_size=384, patch_size=14, hidden_size=1152, num_layers=27, num_heads=16, intermediate_size=4304,
              act="gelu_tanh", norm_eps=1e-6, class_token=False, pre_norm=False, post_norm="all", pool="map",
              patch_bias=True)
    TextEncoderConfig(vocab_size=32000, hidden_size=1152, num_layers=27, num_heads=16, intermediate_size=4304,
                      max_positions=64, act="gelu_tanh", norm_eps=1e-6, causal=False, pool="last",
                      eos_token_id=49407, head=True, projection_size=1152)
    # CLIP ViT-bigG-14 (laion2B-39B-b160k).
    ViTConfig(image_size=224, patch_size=14, hidden_size=1664, num_layers=48, num_heads=16, intermediate_size=8192,
              act="gelu")
    TextEncoderConfig(vocab_size=49408, hidden_size=1280, num_layers=32, num_heads=20, intermediate_size=5120,
                      max_positions=77, act="gelu", eos_token_id=49407)
    BertConfig(vocab_size=30522, hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096)
    # BLIP-2's Q-Former (InstructBLIP's, with its own BERT vocabulary).
    ProjectorConfig(kind="qformer", num_queries=32, num_layers=12, num_heads=12, hidden_size=768,
                    intermediate_size=3072, layer_norm_eps=1e-12, cross_attention_every=2, instruction_aware=True,
                    text_vocab_size=30523, max_text_positions=512)
    EfficientNetConfig(num_classes=21843, image_size=600)
    TrainConfig(steps=10 ** 6, warmup_steps=2000, lr=0.0, betas=(0.0, 0.999), max_grad_norm=None, seed=2 ** 32 - 1)


@pytest.fixture
def unbuildable_layers(monkeypatch):
    """Fail loudly if a decoder layer is ever built: a config of 10**9 layers that slipped through
    would otherwise hang the test (and eat the machine's memory) instead of failing it. This
    stands in for a time limit, which the project's tests do not use."""

    def refuse(*args, **kwargs):
        raise AssertionError("a decoder layer was built from a config that should have been rejected")

    monkeypatch.setattr(decoder, "build_block", refuse)


@pytest.fixture
def tiny_lm(tmp_path):
    """A saved tiny `lm` checkpoint folder."""
    return save_checkpoint(DecoderLM(lm_tiny()), tmp_path / "lm")


def _edit_config(folder, **values) -> None:
    """Overwrite keys of the model config inside a checkpoint's config.json."""
    path = folder / "config.json"
    meta = json.loads(path.read_text())
    meta["config"].update(values)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize(("key", "value"), [("num_layers", 10 ** 9), ("hidden_size", 10 ** 8)])
def test_a_hostile_checkpoint_config_fails_to_load_before_anything_is_built(tiny_lm, unbuildable_layers, key, value):
    _edit_config(tiny_lm, **{key: value})
    with pytest.raises((CheckpointError, ConfigError)) as err:
        polymodal.load(tiny_lm)
    message = str(err.value)
    assert str(tiny_lm / "config.json") in message and f"{key} must be in" in message, message


def test_the_cli_names_config_json_in_one_line(tiny_lm, unbuildable_layers, capsys):
    _edit_config(tiny_lm, num_layers=10 ** 9)
    assert main(["complete", str(tiny_lm), "hi"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("polymodal complete: error: ")]
    assert "Traceback" not in err and len(errors) == 1, err
    assert str(tiny_lm / "config.json") in errors[0] and "num_layers" in errors[0], errors[0]


def test_a_command_line_override_out_of_bounds_names_the_field(unbuildable_layers, capsys):
    assert main(["train", str(LM_RECIPE), "model.num_layers=1000000000"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "num_layers must be in [1, 1024]" in err, err
