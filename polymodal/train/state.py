"""Training state save/restore, without pickle: tensors in safetensors, everything else in JSON.

A training checkpoint folder is a polymodal checkpoint (model.safetensors + config.json) plus:
    trainer_state.safetensors   every tensor of the state below, under its path in the tree
                                (e.g. "optimizers.model.state.3.exp_avg", "extra.ema.shadow.w")
    trainer_state.json          the rest of the tree: step, loss history, each optimizer's param
                                groups and scalar state, each scheduler, the python/numpy RNG
                                states, the data position, the extra state objects (EMA, a
                                discriminator, ...), and the train config (for reference)
Any nested state dict goes through the same two functions (`split_tensors` / `join_tensors`),
which keep what JSON alone would lose: tuples stay tuples and integer keys stay integers.
Training checkpoints live in `<out_dir>/checkpoints/step-XXXXXXX/`, next to a `latest` file that
names the newest one (replaced atomically after each save).
Floats go through JSON via repr, which round-trips doubles exactly, so a restored loss history
and learning rates equal the saved ones bit for bit.
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from polymodal.atomic import write_text_atomic
from polymodal.checkpoint import resolve_checkpoint_folder, save_checkpoint
from polymodal.errors import CheckpointError, NotACheckpointError

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
LATEST_FILE = "latest"
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"  # markers of what JSON cannot say


@dataclass
class TrainingState:
    """Everything besides the model weights needed to continue a run exactly.

    step: optimizer steps completed. losses: the loss of each completed step (len == step).
    optimizers / schedulers: name -> state_dict. rng: `capture_rng()`. data: the data stream's
    `state_dict()` (None for a non-resumable iterable). extra: name -> state_dict of the extra
    state objects given to `train` (EMA weights, extra modules, counters).
    """

    step: int
    losses: list[float]
    optimizers: dict[str, dict]
    schedulers: dict[str, dict]
    rng: dict
    data: dict | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    config: dict = field(default_factory=dict)


def capture_rng() -> dict:
    """The python, numpy, torch-CPU and (if present) CUDA RNG states as tensors + JSON data."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng(state: dict) -> None:
    """Put back RNG states from `capture_rng` (CUDA ones only when CUDA is available)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def split_tensors(tree: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """A JSON-ready copy of a nested state (dicts, lists, tuples, scalars, tensors): every tensor
    moves into `tensors` under its dotted path and is replaced by a marker naming it; tuples and
    dicts with non-string keys are wrapped so `join_tensors` restores them exactly."""
    if isinstance(tree, torch.Tensor):
        tensors[path] = tree.detach().cpu().contiguous()
        return {_TENSOR: path}
    if isinstance(tree, dict):
        if all(isinstance(key, str) for key in tree):
            return {key: split_tensors(value, tensors, f"{path}.{key}" if path else key) for key, value in tree.items()}
        return {_ITEMS: [[key, split_tensors(value, tensors, f"{path}.{key}")] for key, value in tree.items()]}
    if isinstance(tree, tuple):
        return {_TUPLE: [split_tensors(v, tensors, f"{path}.{i}") for i, v in enumerate(tree)]}
    if isinstance(tree, list):
        return [split_tensors(v, tensors, f"{path}.{i}") for i, v in enumerate(tree)]
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    if isinstance(tree, (np.integer, np.floating)):
        return tree.item()
    raise TypeError(f"training state at {path or 'the top'} holds a {type(tree).__name__}, which a checkpoint "
                    "cannot store without pickle; use tensors, numbers, strings, lists and dicts")


def join_tensors(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `split_tensors`."""
    if isinstance(tree, dict):
        if _TENSOR in tree:
            return tensors[tree[_TENSOR]]
        if _TUPLE in tree:
            return tuple(join_tensors(v, tensors) for v in tree[_TUPLE])
        if _ITEMS in tree:
            return {key: join_tensors(value, tensors) for key, value in tree[_ITEMS]}
        return {key: join_tensors(value, tensors) for key, value in tree.items()}
    if isinstance(tree, list):
        return [join_tensors(v, tensors) for v in tree]
    return tree


def save_training_state(folder: str | Path, state: TrainingState) -> None:
    """Write `state` into `folder` as trainer_state.safetensors + trainer_state.json."""
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    doc = {"step": state.step, "losses": state.losses, "config": state.config,
           "state": split_tensors({"optimizers": state.optimizers, "schedulers": state.schedulers, "rng": state.rng,
                                   "data": state.data, "extra": state.extra}, tensors)}
    save_file(tensors, str(folder / STATE_TENSORS))
    (folder / STATE_JSON).write_text(json.dumps(doc), encoding="utf-8")


def load_training_state(folder: str | Path) -> TrainingState:
    """Read the state `save_training_state` wrote into `folder` (tensors on CPU).

    Raises `CheckpointError` naming the file when a state file is missing, truncated or corrupt."""
    folder = Path(folder)
    for name in (STATE_TENSORS, STATE_JSON):
        if not (folder / name).is_file():
            raise NotACheckpointError(f"{folder} is not a training checkpoint: it lacks {name}")
    try:
        tensors = load_file(str(folder / STATE_TENSORS))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{folder / STATE_TENSORS} is corrupt or truncated ({err})") from None
    try:
        doc = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
        tree = join_tensors(doc["state"], tensors)
        return TrainingState(step=doc["step"], losses=doc["losses"], optimizers=tree["optimizers"],
                             schedulers=tree["schedulers"], rng=tree["rng"], data=tree["data"], extra=tree["extra"],
                             config=doc.get("config", {}))
    except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{folder / STATE_JSON} is corrupt or from an older polymodal ({err!r})") from None


def checkpoint_name(step: int) -> str:
    """The folder name of the training checkpoint after `step` optimizer steps."""
    return f"step-{step:07d}"


def save_training_checkpoint(
    root: str | Path,
    model: torch.nn.Module,
    state: TrainingState,
    *,
    tokenizer: Any = None,
    keep: int = 0,
) -> Path:
    """Atomically write `root/step-XXXXXXX/` (model + `state`), point `root/latest` at it, prune.

    Only the newest `keep` step folders are kept (all of them when keep <= 0); the folder that
    `latest` names is never removed.
    """
    root = Path(root)
    folder = root / checkpoint_name(state.step)
    save_checkpoint(model, folder, tokenizer, extra={"step": state.step},
                    extra_files=lambda tmp: save_training_state(tmp, state))
    write_text_atomic(root / LATEST_FILE, folder.name + "\n")
    if keep > 0:
        for old in list_training_checkpoints(root)[:-keep]:
            if old != folder:
                shutil.rmtree(old)
    return folder


def list_training_checkpoints(root: str | Path) -> list[Path]:
    """Complete `step-*` checkpoint folders under `root`, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.name[5:].isdigit() and _is_training_checkpoint(p)]
    return sorted(found, key=lambda p: int(p.name[5:]))


def find_latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint `root/latest` points to, else the newest complete one, else None.

    A `latest` that names a missing or incomplete folder (a crash mid-save) is ignored in favour
    of the newest complete step folder, including one a swap interrupted mid-way left aside.
    """
    root = Path(root)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        try:
            folder = resolve_checkpoint_folder(root / name)
        except NotACheckpointError:
            folder = None
        if folder is not None and _is_training_checkpoint(folder):
            return folder
    complete = list_training_checkpoints(root)
    return complete[-1] if complete else None


def resume_candidates(root: str | Path) -> list[Path]:
    """Checkpoints a run may resume from, best first: `find_latest_checkpoint`, then every other
    complete step folder, newest first (the fallbacks when a newer one turns out corrupt)."""
    latest = find_latest_checkpoint(root)
    others = [p for p in reversed(list_training_checkpoints(root)) if p != latest]
    return ([latest] if latest is not None else []) + others


def _is_training_checkpoint(folder: Path) -> bool:
    """Whether `folder` holds model weights, config and both trainer-state files."""
    names = ("config.json", "model.safetensors", STATE_TENSORS, STATE_JSON)
    return all((folder / name).is_file() for name in names)
