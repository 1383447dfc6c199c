"""The family registry: every model family registers its config class, builder and tiny size.

The registry is what makes families plug-in: tests parametrize over `list_families()` to build
every `tiny` model, run forward/backward and a checkpoint round trip, and `polymodal.load` uses it
to rebuild a model from the `family` name stored in a polymodal checkpoint's `config.json`.
"""
from __future__ import annotations

import dataclasses
import importlib
import typing
from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn


@dataclass(frozen=True)
class Family:
    """A registered model family.

    name: the key stored in checkpoints (e.g. "lm", "vit").
    config_cls: the family's config dataclass.
    build: config -> nn.Module (the module keeps the config as `.config`).
    tiny: () -> config of a model small enough for a unit test (seconds on CPU).
    example_batch: (model) -> dict of keyword inputs for a forward pass; the model's forward must
        return a tensor or an object with `.loss` when given these inputs.
    """

    name: str
    config_cls: type
    build: Callable[[Any], nn.Module]
    tiny: Callable[[], Any]
    example_batch: Callable[[nn.Module], dict]


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family to the registry (module import time); re-registering a name is an error."""
    if family.name in _FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    """Return the family registered under `name`, with a clear error listing the known ones."""
    _import_builtin_families()
    try:
        return _FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; known: {sorted(_FAMILIES)}") from None


def list_families() -> list[str]:
    """Names of every registered family, sorted."""
    _import_builtin_families()
    return sorted(_FAMILIES)


def config_to_dict(config: Any) -> dict:
    """A JSON-ready dict of a (possibly nested) config dataclass."""
    return dataclasses.asdict(config)


def config_from_dict(config_cls: type, data: dict) -> Any:
    """Rebuild a config dataclass from `config_to_dict` output, rejecting unknown keys by name."""
    hints = typing.get_type_hints(config_cls)
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{config_cls.__name__}: unknown config keys {unknown}")
    kwargs = {}
    for key, value in data.items():
        nested = hints.get(key)
        if isinstance(nested, type) and dataclasses.is_dataclass(nested) and isinstance(value, dict):
            value = config_from_dict(nested, value)
        kwargs[key] = value
    return config_cls(**kwargs)


# One line per built-in family module; importing it runs its `register` call. Imported lazily,
# on the first registry lookup, so that importing any one module never drags in every family.
BUILTIN_FAMILY_MODULES = (
    "polymodal.models.lm",
    "polymodal.models.vit",
    "polymodal.models.bert",
    "polymodal.models.contrastive",
    "polymodal.models.mmllm",
)


def _import_builtin_families() -> None:
    """Import the built-in family modules so their `register` calls run."""
    for module in BUILTIN_FAMILY_MODULES:
        importlib.import_module(module)
