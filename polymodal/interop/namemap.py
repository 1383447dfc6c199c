"""Two-way tensor-name maps between a foreign checkpoint layout and our module names.

A map is a list of (foreign, ours) module-path templates where `{}` stands for a layer index,
e.g. ("model.layers.{}.input_layernorm", "layers.layers.{}.attn_norm"). A template matches a
tensor name exactly or as a prefix followed by ".", so one pair covers `.weight` and `.bias`.

`state_from_foreign` is the one import skeleton every converter uses: drop the tensors a model
does not use, check the rest against the names and shapes the model needs (in the file's own
names, so a user can find them), then rename. Family twists (packed projections, reshaped
parameters, a tied head) are its `ignore` and `rename` hooks.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping

import torch

from polymodal.checkpoint import CheckpointMismatchError

# (foreign name, tensor) -> {our name: tensor}: one entry, or several when a packed tensor unpacks.
Rename = Callable[[str, torch.Tensor], dict[str, torch.Tensor]]


def _compile(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)") + r"(\..+)?$")


class NameMap:
    """Renames tensors between a foreign layout and ours; see the module docstring for templates."""

    def __init__(self, pairs: list[tuple[str, str]]):
        self.pairs = pairs
        self._foreign = [(_compile(f), o) for f, o in pairs]
        self._ours = [(_compile(o), f) for f, o in pairs]

    @staticmethod
    def _rename(name: str, rules: list[tuple[re.Pattern, str]]) -> str | None:
        for pattern, target in rules:
            match = pattern.match(name)
            if match:
                *indices, rest = match.groups()
                return target.format(*indices) + (rest or "")
        return None

    def to_ours(self, name: str) -> str | None:
        """Our name for a foreign tensor name, or None when no template matches."""
        return self._rename(name, self._foreign)

    def to_foreign(self, name: str) -> str | None:
        """The foreign name for one of our tensor names, or None when no template matches."""
        return self._rename(name, self._ours)


def check_tensor_names(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], source: str) -> None:
    """Compare a file's tensor {name: shape} against the names/shapes a model needs, in the file's own names.

    Raises `CheckpointMismatchError` naming `source` and every missing, unexpected or
    wrongly-shaped tensor (with both shapes), so a user can find them in the file.
    """
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(k for k in found if k not in expected)
    mismatched = sorted(
        f"{k}: file {tuple(found[k])} vs expected {tuple(expected[k])}"
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k])
    )
    if missing or unexpected or mismatched:
        lines = [f"tensors in {source} do not fit the model its config describes:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", mismatched)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items))
        raise CheckpointMismatchError("\n".join(lines))


def shapes_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a tensor dict (real or meta tensors alike)."""
    return {name: tuple(t.shape) for name, t in tensors.items()}


def renamer(names: NameMap, prefix: str = "") -> Rename:
    """A `Rename` that strips `prefix` from a foreign name and maps the rest through `names`."""
    def rename(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        return {names.to_ours(name[len(prefix):]): tensor}
    return rename


def state_from_foreign(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], source: str,
                       rename: Rename, ignore: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """Check a foreign checkpoint's tensors against what a model needs, then rename them to our names.

    tensors: {foreign name: tensor}, real or meta stand-ins read from the file headers (the
        checks and renames only look at shapes, so a meta dry run validates a folder for free).
    expected: {foreign name: shape} the model needs; converters derive it from their own export
        of the model's state dict, so import and export cannot drift apart.
    ignore(name): True for tensors a file may hold that the model does not use (persisted
        buffers, a tied head, another tower's weights); they are neither checked nor returned.
    rename: see `Rename`. Raises `CheckpointMismatchError` naming `source` before renaming.
    """
    kept = {name: t for name, t in tensors.items() if ignore is None or not ignore(name)}
    check_tensor_names(expected, shapes_of(kept), source)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in kept.items():
        state.update(rename(name, tensor))
    return state
