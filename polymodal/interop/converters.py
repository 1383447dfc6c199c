"""Converters: how a model family reads (and writes) the checkpoint folders of other libraries.

A `Converter` says which folders it reads by what their config.json declares (transformers'
`architectures` / `model_type`, diffusers' `_class_name`) and translates them: the folder's
config into the family's config dataclass, its tensors into the family model's state dict, and,
optionally, back for export. A family lists its converters in its registry entry:

    register(Family("lm", ..., converters=("polymodal.interop.hf_lm:HF_LM_CONVERTER",)))

`converter_for` and `exporter_for` find them through the registry only, so `polymodal.interop.hf`
names no family, and a new family's converter needs no other file changed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
import torch.nn as nn

from polymodal.config import config_from_mapping
from polymodal.errors import CheckpointError, UnsupportedTaskError
from polymodal.models.registry import Family, families, family_of, resolve

if TYPE_CHECKING:
    from polymodal.interop.safetensors_io import HFWeights


@dataclass(frozen=True)
class Converter:
    """One outside folder layout that a family reads (and perhaps writes).

    name: what messages call it, e.g. "Llama / Mistral / Qwen2 causal LM".
    family: the registry name of the family whose models it builds.
    architectures / model_types / class_names: the config.json declarations it reads (entries of
        `architectures`, the `model_type`, diffusers' `_class_name`).
    config_from(cfg, weights, source) -> the family config. cfg: the parsed config.json;
        weights: the folder's `HFWeights` (stored names and shapes; `tensor(name)` reads one
        small tensor when a config value lives in the weights); source: the config.json path.
    state_from(tensors, model, source) -> the model's state dict from {name in the file: tensor}.
        It runs twice: on meta stand-ins against a model built on the meta device (the check
        before anything is allocated), then on the loaded tensors. Build it on
        `polymodal.interop.namemap.state_from_foreign`.
    config_to(model, tokenizer) -> a config.json dict; raises ValueError naming the config fields
        that have no equivalent in the written architecture. state_to(state, config) -> {name in
        the file: tensor}. Both or neither (import-only).
    can_export(model) -> whether this converter writes `model`; None: every model of its family
        (then `config_to` alone refuses the configs it cannot write).
    """

    name: str
    family: str
    config_from: Callable[[dict, "HFWeights", str], Any]
    state_from: Callable[[Mapping[str, torch.Tensor], nn.Module, str], dict[str, torch.Tensor]]
    architectures: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()
    class_names: tuple[str, ...] = ()
    config_to: Callable[[nn.Module, Any], dict] | None = None
    state_to: Callable[[dict[str, torch.Tensor], Any], dict[str, torch.Tensor]] | None = None
    can_export: Callable[[nn.Module], bool] | None = None

    def __post_init__(self) -> None:
        if not (self.architectures or self.model_types or self.class_names):
            raise ValueError(f"converter {self.name!r} declares no architectures, model_types or class_names")
        if (self.config_to is None) != (self.state_to is None):
            raise ValueError(f"converter {self.name!r}: give config_to and state_to together (or neither)")
        if self.can_export is not None and self.config_to is None:
            raise ValueError(f"converter {self.name!r}: can_export without config_to/state_to")


def converters_of(family: Family) -> list[Converter]:
    """The converters a family's spec lists, resolved (a TypeError names a reference that is not one)."""
    out = []
    for ref in family.converters:
        converter = resolve(ref)
        if not isinstance(converter, Converter) or converter.family != family.name:
            raise TypeError(f"family {family.name!r}: converter reference {ref!r} is not a Converter of that family")
        out.append(converter)
    return out


def registered_converters() -> list[Converter]:
    """Every registered family's converters, family by family."""
    return [converter for family in families() for converter in converters_of(family)]


def converter_for(cfg: dict, source: str) -> Converter:
    """The converter that reads a folder whose config.json (at `source`) parsed to `cfg`.

    Dispatch on what the folder declares: its `architectures` when it lists any (a converter must
    read every one of them), else its `model_type`, else its `_class_name`. Raises
    `CheckpointError` naming the file, the declaration and the supported ones when no converter
    reads it; a declaration two converters claim is a registry error (a ValueError naming both).
    """
    architectures = cfg.get("architectures") or []
    model_type, class_name = cfg.get("model_type"), cfg.get("_class_name")
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise CheckpointError(f"{source}: 'architectures' must be a list of class names, got {architectures!r}")
    converters = registered_converters()
    if architectures:
        found = [c for c in converters if all(a in c.architectures for a in architectures)]
        declared = f"architectures {architectures} (model_type {model_type!r})"
    elif model_type is not None:
        found = [c for c in converters if model_type in c.model_types]
        declared = f"model_type {model_type!r} (no 'architectures')"
    else:
        found = [c for c in converters if class_name is not None and class_name in c.class_names]
        declared = f"_class_name {class_name!r}" if class_name is not None else "declaring no model"
    if len(found) > 1:
        raise ValueError(f"{source}: {declared} is claimed by several converters: "
                         f"{[f'{c.family}: {c.name}' for c in found]}; unregister all but one")
    if not found:
        supported = {"architectures": [a for c in converters for a in c.architectures],
                     "model_types": [t for c in converters for t in c.model_types],
                     "_class_names": [n for c in converters for n in c.class_names]}
        listing = "; ".join(f"{key}: {values}" for key, values in supported.items() if values)
        raise CheckpointError(f"{source}: {declared} is not supported; supported {listing}")
    return found[0]


def exporter_for(model: nn.Module) -> Converter:
    """The converter that writes `model` as an outside folder: the first of its family's
    converters that exports and accepts it. Raises `UnsupportedTaskError` naming the model and
    what can be exported."""
    family = family_of(model)
    for converter in converters_of(family):
        if converter.config_to is not None and (converter.can_export is None or converter.can_export(model)):
            return converter
    exportable = [f"{c.family}: {c.name}" for c in registered_converters() if c.config_to is not None]
    raise UnsupportedTaskError(f"a {family.name!r} model ({type(model).__name__}) has no outside layout to export "
                               f"to; exportable: {exportable}")


def translate_config(converter: Converter, cfg: dict, weights: "HFWeights", source: str) -> Any:
    """`converter.config_from(cfg, weights, source)`, with every way a hand-edited or hostile
    config.json can break it (a missing key, a value of the wrong kind, a refused value) turned
    into one `CheckpointError` line naming `source`."""
    try:
        return converter.config_from(cfg, weights, source)
    except CheckpointError:
        raise
    except KeyError as err:
        raise CheckpointError(f"{source}: required key {err} is missing") from None
    except (TypeError, ValueError, AttributeError) as err:
        message = str(err) if source in str(err) else f"{source}: {err}"
        raise CheckpointError(message.replace("\n", " ")) from None


def build_config(cls: type, fields: dict, source: str, keys: Mapping[str, str] | None = None) -> Any:
    """`cls` built from `fields` by `config_from_mapping`: value types are checked and the
    dataclass applies its own bounds, so nothing is allocated from a hostile value.

    A refused value becomes a one-line `CheckpointError` naming `source` and, for each field the
    message names, the key in `source` it came from (`keys`: field -> key, where they differ).
    """
    try:
        return config_from_mapping(cls, fields, source=source)
    except ValueError as err:
        message = str(err).replace("\n", " ")
        named = [key for field, key in (keys or {}).items() if re.search(rf"\b{re.escape(field)}\b", message)]
        hint = f" (from key {', '.join(repr(k) for k in named)})" if named else ""
        raise CheckpointError(f"{message}{hint}") from None


__all__ = ["Converter", "build_config", "converter_for", "converters_of", "exporter_for", "registered_converters",
           "translate_config"]
