"""Two-way tensor-name maps between a foreign checkpoint layout and our module names.

A map is a list of (foreign, ours) module-path templates where `{}` stands for a layer index,
e.g. ("model.layers.{}.input_layernorm", "layers.layers.{}.attn_norm"). A template matches a
tensor name exactly or as a prefix followed by ".", so one pair covers `.weight` and `.bias`.
"""
from __future__ import annotations

import re

from polymodal.checkpoint import CheckpointMismatchError


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
