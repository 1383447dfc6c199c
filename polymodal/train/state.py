"""Training state save/restore, without pickle: tensors in safetensors, everything else in JSON.

A training checkpoint folder is a polymodal checkpoint (model.safetensors + config.json) plus:
    trainer_state.safetensors   optimizer tensors ("optimizer.<param index>.<name>", e.g. exp_avg)
                                and torch RNG states ("rng.torch", "rng.cuda.<device>")
    trainer_state.json          step, optimizer param groups and non-tensor per-param state,
                                scheduler state, python/numpy RNG states, data position,
                                loss history, and the train config (for reference)
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
from safetensors.torch import load_file, save_file

from polymodal.atomic import write_text_atomic
from polymodal.checkpoint import NotACheckpointError, resolve_checkpoint_folder, save_checkpoint

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
LATEST_FILE = "latest"


@dataclass
class TrainingState:
    """Everything besides the model weights needed to continue a run exactly.

    step: optimizer steps completed. losses: the loss of each completed step (len == step).
    data: the data stream's `state_dict()` (None for a non-resumable iterable).
    """

    step: int
    losses: list[float]
    optimizer: dict
    scheduler: dict
    rng: dict
    data: dict | None = None
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


def save_training_state(folder: str | Path, state: TrainingState) -> None:
    """Write `state` into `folder` as trainer_state.safetensors + trainer_state.json."""
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    per_param: dict[str, dict] = {}
    for index, values in state.optimizer["state"].items():
        plain = {}
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain[name] = value
        per_param[str(index)] = plain
    rng = dict(state.rng)
    tensors["rng.torch"] = rng.pop("torch")
    for device, cuda_state in enumerate(rng.pop("cuda", [])):
        tensors[f"rng.cuda.{device}"] = cuda_state.cpu()
    save_file(tensors, str(folder / STATE_TENSORS))
    doc = {
        "step": state.step,
        "losses": state.losses,
        "optimizer": {"param_groups": state.optimizer["param_groups"], "state": per_param},
        "scheduler": state.scheduler,
        "rng": rng,
        "data": state.data,
        "config": state.config,
    }
    (folder / STATE_JSON).write_text(json.dumps(doc), encoding="utf-8")


def load_training_state(folder: str | Path) -> TrainingState:
    """Read the state `save_training_state` wrote into `folder` (tensors on CPU)."""
    folder = Path(folder)
    for name in (STATE_TENSORS, STATE_JSON):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a training checkpoint: it lacks {name}")
    tensors = load_file(str(folder / STATE_TENSORS))
    doc = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
    per_param: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in doc["optimizer"]["state"].items()}
    for key, tensor in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = tensor
    groups = doc["optimizer"]["param_groups"]
    for group in groups:
        # JSON turns tuples into lists; AdamW documents `betas` as a tuple.
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    rng = dict(doc["rng"])
    rng["torch"] = tensors["rng.torch"]
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda:
        rng["cuda"] = [tensors[k] for k in cuda]
    return TrainingState(
        step=doc["step"],
        losses=doc["losses"],
        optimizer={"state": per_param, "param_groups": groups},
        scheduler=doc["scheduler"],
        rng=rng,
        data=doc["data"],
        config=doc.get("config", {}),
    )


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


def _is_training_checkpoint(folder: Path) -> bool:
    """Whether `folder` holds model weights, config and both trainer-state files."""
    names = ("config.json", "model.safetensors", STATE_TENSORS, STATE_JSON)
    return all((folder / name).is_file() for name in names)
