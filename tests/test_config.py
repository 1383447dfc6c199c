"""YAML configs with key=value overrides, typed coercion and errors that name the key and source."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from polymodal.config import ConfigError, config_to_yaml, load_config
from polymodal.train.loop import TrainConfig


@dataclass
class Inner:
    dim: int = 8
    act: Literal["gelu", "silu"] = "gelu"


@dataclass(frozen=True)
class Outer:
    name: str
    lr: float = 1e-3
    flag: bool = False
    sizes: list[int] = field(default_factory=lambda: [1])
    shape: tuple[int, int] = (2, 3)
    limit: Optional[int] = None
    path: Path = Path("runs")
    inner: Inner = field(default_factory=Inner)


def _write(tmp_path, text) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_yaml_then_overrides(tmp_path):
    path = _write(tmp_path, "name: demo\nlr: 0.01\nshape: [4, 5]\ninner:\n  dim: 16\n")
    config = load_config(Outer, path, ["lr=3e-4", "flag=true", "sizes=[1,2]", "inner.act=silu", "limit=7"])
    assert config == Outer(name="demo", lr=3e-4, flag=True, sizes=[1, 2], shape=(4, 5), limit=7,
                           inner=Inner(dim=16, act="silu"))
    assert isinstance(config.lr, float) and isinstance(config.shape, tuple)


def test_overrides_without_file_and_string_fields_keep_raw_text():
    config = load_config(Outer, None, ["name=007", "limit=null", "path=out/x", "inner.dim=32.0"])
    assert config.name == "007" and config.limit is None and config.path == Path("out/x")
    assert config.inner.dim == 32 and isinstance(config.inner.dim, int)


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = _write(tmp_path, "name: x\ninner:\n  dimm: 3\n")
    with pytest.raises(ConfigError, match=r"'inner\.dimm'.*config\.yaml"):
        load_config(Outer, path)


def test_unknown_key_on_command_line(tmp_path):
    with pytest.raises(ConfigError, match=r"'inner\.width' on the command line"):
        load_config(Outer, None, ["name=x", "inner.width=3"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Outer, None, ["name"])


def test_type_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"'flag'.*command line"):
        load_config(Outer, None, ["name=x", "flag=maybe"])
    with pytest.raises(ConfigError, match=r"'inner\.act'"):
        load_config(Outer, None, ["name=x", "inner.act=relu"])
    with pytest.raises(ConfigError, match=r"'shape'.*2 items"):
        load_config(Outer, _write(tmp_path, "name: x\nshape: [1, 2, 3]\n"))
    with pytest.raises(ConfigError, match=r"'sizes\[1\]'"):
        load_config(Outer, None, ["name=x", "sizes=[1, b]"])


def test_missing_required_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="required config key 'name'"):
        load_config(Outer, None, ["lr=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Outer, _write(tmp_path, "- 1\n- 2\n"))


def test_yaml_round_trip(tmp_path):
    config = Outer(name="r", sizes=[3, 4], shape=(7, 8), path=Path("a/b"), inner=Inner(dim=2, act="silu"))
    path = _write(tmp_path, config_to_yaml(config))
    assert load_config(Outer, path) == config


def test_train_config_from_yaml(tmp_path):
    path = _write(tmp_path, "steps: 20\nbetas: [0.9, 0.99]\nschedule: linear\nout_dir: runs/x\n")
    config = load_config(TrainConfig, path, ["lr=1e-3", "max_grad_norm=null", "warmup_steps=2"])
    assert config.betas == (0.9, 0.99) and config.schedule == "linear" and config.max_grad_norm is None
    assert config.lr == 1e-3 and config.out_dir == "runs/x" and config.steps == 20
    with pytest.raises(ConfigError, match="grad_accum"):
        load_config(TrainConfig, None, ["grad_accum=0"])
