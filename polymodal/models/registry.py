"""The family registry: one `Family` spec carries everything a model family contributes.

A family module in `polymodal/models/` ends with one `register(Family(...))` call naming its
config class, builder, tiny size, example batch and objective (what the registry-driven tests
run), the tasks its models can do (what `polymodal complete/chat/eval`, and later the server,
dispatch on), its training recipes, its evaluation suite and its converters for outside
checkpoint folders. Adding a family is that module, its configs, its tests and one line in
`BUILTIN_FAMILY_MODULES`; nothing else in the library names families.

References to code that lives above `models/` in the import graph (recipes import the models;
evaluators import recipes' data helpers) are given as "module:attribute" strings and imported on
first use (`resolve`), so importing a family never drags in training or evaluation code.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch.nn as nn

from polymodal.errors import UnsupportedTaskError

# A callable, or "package.module:attribute" naming one, imported when first used.
Ref = Union[str, Callable[..., Any]]

# The tasks a family can declare. Each is a contract on the model object:
#   complete        generate(input_ids, ...) continues text
#   chat            complete, plus a chat template (and images, for models with image slots)
#   embed           encode_* methods returning vectors (encode_image / encode_text / encode)
#   generate_image  generate_images(prompts, ...) -> PIL images
TASKS = ("complete", "chat", "embed", "generate_image", "transcribe", "speak", "segment")


def resolve(ref: Ref) -> Callable[..., Any]:
    """The callable a `Ref` names (a callable is returned as is)."""
    if callable(ref):
        return ref
    module, _, attribute = ref.partition(":")
    if not attribute:
        raise ValueError(f"reference {ref!r} must look like 'package.module:attribute'")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class Recipe:
    """A training recipe: `polymodal train CONFIG.yaml` whose `recipe:` key is `name`.

    config: the recipe's config dataclass (it has a `train: TrainConfig` field).
    setup: config -> `polymodal.recipes.runner.TrainingJob` (model, data, objective, ...); the
        shared runner then seeds, trains, and writes the one output layout every recipe has.
    outputs: the files the recipe writes into the output folder besides that layout (claimed
        before anything runs, so they are never written over a user's file).
    """

    name: str
    config: Ref
    setup: Ref
    outputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Family:
    """Everything one model family contributes (see the module docstring).

    name: the key stored in checkpoints (e.g. "lm", "clip").
    config_cls: the family's config dataclass; build: config -> nn.Module (the module keeps the
        config as `.config` and the family name as `.family`).
    tiny: () -> a config small enough for a unit test; example_batch: model -> a batch that
        `objective(model, batch)` turns into a scalar loss (the registry test trains one step).
        A family of parts that other families compose (a vision tower) may have no objective;
        its example batch is then the keyword inputs of one forward pass.
    tasks: what its models can do, from `TASKS`.
    recipes: its training recipes; evaluate: (model, tokenizer, data, split, n, progress) ->
        {metric: value}, the suite `polymodal eval` runs.
    converters: `polymodal.interop.converters.Converter`s for outside folders (HF, diffusers).
    parts: attribute names of sub-models stored as parts of a checkpoint (each its own family,
        config and safetensors file; the family config holds each part's config in a field of
        the same name).
    """

    name: str
    config_cls: type
    build: Callable[[Any], nn.Module]
    tiny: Callable[[], Any]
    example_batch: Callable[[nn.Module], Any]
    objective: Ref | None = None
    tasks: tuple[str, ...] = ()
    recipes: tuple[Recipe, ...] = ()
    evaluate: Ref | None = None
    converters: tuple[Ref, ...] = ()
    parts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [task for task in self.tasks if task not in TASKS]
        if unknown:
            raise ValueError(f"family {self.name!r}: unknown tasks {unknown}; known: {list(TASKS)}")


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family to the registry (module import time); re-registering a name is an error, and
    so is a recipe name another family already registered."""
    if family.name in _FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    taken = {recipe.name: other.name for other in _FAMILIES.values() for recipe in other.recipes}
    for recipe in family.recipes:
        if recipe.name in taken:
            raise ValueError(f"recipe {recipe.name!r} of family {family.name!r} is already registered by "
                             f"family {taken[recipe.name]!r}")
    _FAMILIES[family.name] = family
    return family


def unregister(name: str) -> None:
    """Remove a family (tests that register a throwaway family clean up with this)."""
    _FAMILIES.pop(name, None)


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


def families() -> list[Family]:
    """Every registered family, by name."""
    return [get_family(name) for name in list_families()]


def get_recipe(name: str) -> tuple[Family, Recipe]:
    """The family owning recipe `name` and the recipe; a KeyError lists the known recipes."""
    for family in families():
        for recipe in family.recipes:
            if recipe.name == name:
                return family, recipe
    known = sorted(recipe.name for family in families() for recipe in family.recipes)
    raise KeyError(f"unknown recipe {name!r}; known: {known}")


def family_of(model: nn.Module) -> Family:
    """The registered family of a model object (by its `family` attribute)."""
    name = getattr(model, "family", None)
    if not isinstance(name, str):
        raise UnsupportedTaskError(f"{type(model).__name__} belongs to no registered model family")
    return get_family(name)


def tasks_of(model: nn.Module) -> tuple[str, ...]:
    """The tasks a model can do: its own `tasks` attribute when it narrows them (a contrastive
    model without a caption decoder), else its family's declaration."""
    own = getattr(model, "tasks", None)
    return tuple(own) if own is not None else family_of(model).tasks


def require_task(model: nn.Module, task: str) -> None:
    """Raise `UnsupportedTaskError` unless `model` declares `task`, naming what it can do instead."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {list(TASKS)}")
    tasks = tasks_of(model)
    if task not in tasks:
        family = getattr(model, "family", type(model).__name__)
        can = ", ".join(tasks) if tasks else "nothing servable"
        raise UnsupportedTaskError(f"a {family!r} model ({type(model).__name__}) cannot {task}; it can: {can}")


def config_to_dict(config: Any) -> dict:
    """A JSON-ready dict of a (possibly nested) config dataclass."""
    return dataclasses.asdict(config)


# One line per built-in family module; importing it runs its `register` call. Imported lazily,
# on the first registry lookup, so that importing any one module never drags in every family.
BUILTIN_FAMILY_MODULES = (
    "polymodal.models.lm",
    "polymodal.models.vit",
    "polymodal.models.bert",
    "polymodal.models.contrastive",
    "polymodal.models.mmllm",
    "polymodal.models.vae",
    "polymodal.models.diffusion",
    "polymodal.models.image_vq",
    "polymodal.models.unified",
    "polymodal.models.cogvlm",
    "polymodal.models.flamingo",
    "polymodal.models.blip",
)


def _import_builtin_families() -> None:
    """Import the built-in family modules so their `register` calls run."""
    for module in BUILTIN_FAMILY_MODULES:
        importlib.import_module(module)


__all__ = ["TASKS", "Family", "Recipe", "Ref", "config_to_dict", "families", "family_of", "get_family",
           "get_recipe", "list_families", "register", "require_task", "resolve", "tasks_of", "unregister"]
