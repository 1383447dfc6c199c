"""Sharded training checkpoints with `torch.distributed.checkpoint` (DCP), resumable at any world
size, and their conversion to the single-file `final/` folder that `polymodal.load` reads.

Layout of `<out_dir>/checkpoints/step-XXXXXXX/` (next to the same `latest` pointer as a
single-process run's checkpoints):
    shards/                   DCP in safetensors: every rank writes its own shard of the model
                              weights ("model.<name>") and optimizer state ("optim.<optimizer>.
                              state.<name>.<key>"); each file's header records where its pieces
                              sit in the full tensors, so any world size can read them back
                              (resharding) and nothing is unpickled (DCP's default `.metadata`
                              file is a pickle; the safetensors storage rebuilds it from headers)
    model.json                the model's family and config (to rebuild it for conversion)
    trainer_state.json/.safetensors   as `polymodal.train.state` writes them (rank 0): step,
                              losses, schedulers, data position (global: the same on every
                              rank), extra state, the optimizers' hyper-parameters, and the RNG
                              state of every rank; DTensors in extra state (an EMA of sharded
                              weights) go to shards/ as "extra.<name>.<key>" instead, and the
                              JSON names them there
    tokenizer files
A save goes to `step-XXXXXXX.partial/` and is renamed once every rank has written (a crash
mid-save leaves no folder that looks complete). The data position is global and the shards are
resharded on load, so a run saved at world size 2 continues at 1 or 4 with the same next batch
and weights; per-rank RNG states come back at the same world size, and are re-seeded from
(seed, step, rank) at another one.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from polymodal.atomic import write_text_atomic
from polymodal.checkpoint import TOKENIZER_FILE, load_state_dict_checked, save_checkpoint
from polymodal.config import config_from_mapping
from polymodal.errors import CheckpointError, NotACheckpointError
from polymodal.models.registry import config_to_dict, get_family
from polymodal.train.optim import Optimization, keep_implementation
from polymodal.train.state import (
    LATEST_FILE, STATE_JSON, STATE_TENSORS, TrainingState, capture_rng, checkpoint_name, load_training_state,
    restore_rng, save_training_state,
)

SHARDS = "shards"
MODEL_JSON = "model.json"
PARTIAL = ".partial"
MODEL_PREFIX, OPTIM_PREFIX, EXTRA_PREFIX = "model.", "optim.", "extra."
PLAIN = "whole"
IN_SHARDS = "__in_shards__"  # marks where extra state holds a tensor stored in shards/


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def _sharded_state(model: nn.Module, optimizations: dict[str, Optimization]) -> tuple[dict, dict]:
    """(tensors for DCP under flat keys, the optimizers' non-tensor entries {name: {key: value}}).

    Optimizer state is materialised when empty (a fresh run about to load), so it can be loaded
    into. An optimizer of parameters outside the model (a discriminator's, kept equal on every
    rank) is stored whole by rank 0, as {PLAIN: its state_dict}."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    tensors = {MODEL_PREFIX + key: value for key, value in _untied(get_model_state_dict(model)).items()}
    plain: dict[str, dict] = {}
    owned = set(model.parameters())
    for name, o in optimizations.items():
        if not all(p in owned for group in o.optimizer.param_groups for p in group["params"]):
            plain[name] = {PLAIN: o.optimizer.state_dict()}
            continue
        flat = get_optimizer_state_dict(model, o.optimizer, options=_options())
        plain[name] = {}
        for key, value in flat.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{OPTIM_PREFIX}{name}.{key}"] = value
            else:
                plain[name][key] = value
    return tensors, plain


def _storage_key(value: torch.Tensor) -> tuple:
    """What identifies a tensor's memory (a DTensor's local shard): tied weights share it."""
    local = value.to_local() if hasattr(value, "to_local") else value
    return local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape)


def _untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict without the second and later names of tied weights (lm_head = embed_tokens):
    safetensors stores each memory once. Loading fills the tied names by loading the first."""
    seen: set[tuple] = set()
    kept = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.numel():
            ident = _storage_key(value)
            if ident in seen:
                continue
            seen.add(ident)
        kept[key] = value
    return kept


def _sharded_extra(tree: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """`tree` (an extra state's state_dict) with every DTensor moved into `tensors` under
    "extra.<path>" and replaced by a marker naming that key; the rest is kept as it is."""
    from torch.distributed.tensor import DTensor

    if isinstance(tree, DTensor):
        tensors[EXTRA_PREFIX + path] = tree
        return {IN_SHARDS: EXTRA_PREFIX + path}
    if isinstance(tree, dict):
        return {key: _sharded_extra(value, tensors, f"{path}.{key}") for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_sharded_extra(value, tensors, f"{path}.{i}") for i, value in enumerate(tree))
    return tree


def _load_targets(saved: Any, live: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """`saved` (a checkpoint's extra state) with each marker replaced by the live state's tensor at
    the same place, which is also put into `tensors` for DCP to load into (a DTensor loads its
    shard, a plain tensor the whole, whatever the world size that saved it)."""
    if isinstance(saved, dict) and set(saved) == {IN_SHARDS}:
        if not isinstance(live, torch.Tensor):
            raise CheckpointError(f"the checkpoint stores {where} in shards, but this run holds no tensor there")
        tensors[saved[IN_SHARDS]] = live
        return live
    if isinstance(saved, dict):
        held = live if isinstance(live, dict) else {}
        return {key: _load_targets(value, held.get(key), tensors, f"{where}.{key}") for key, value in saved.items()}
    if isinstance(saved, (list, tuple)):
        held = live if isinstance(live, (list, tuple)) and len(live) == len(saved) else [None] * len(saved)
        return type(saved)(_load_targets(value, other, tensors, f"{where}.{i}")
                           for i, (value, other) in enumerate(zip(saved, held)))
    return saved


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class DistributedCheckpointer:
    """The training loop's checkpoint seam for multi-process runs (see the module docstring).

    seed: the run's seed, for re-seeding the RNGs of a run resumed at another world size.
    Every method is collective: every rank calls it, in the same order.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def candidates(self, root: Path) -> list[Path]:
        """Complete sharded checkpoints under `root`, best first: the one `latest` names, then
        the others newest first."""
        found = sorted((p for p in Path(root).glob("step-*") if is_sharded_checkpoint(p)),
                       key=lambda p: int(p.name[5:]), reverse=True)
        pointer = Path(root) / LATEST_FILE
        if pointer.is_file():
            named = Path(root) / pointer.read_text(encoding="utf-8").strip()
            if named in found:
                found.remove(named)
                found.insert(0, named)
        return found

    def save(self, root: Path, model: nn.Module, optimizations: dict[str, Optimization], snapshot: TrainingState,
             *, tokenizer: Any = None, keep: int = 0) -> Path:
        """Write the step folder of `snapshot.step` (every rank its shards, rank 0 the rest),
        point `latest` at it and keep the newest `keep` (all when 0). Returns the folder."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageWriter

        rank, world = _rank_world()
        root = Path(root)
        folder = root / checkpoint_name(snapshot.step)
        tmp = folder.with_name(folder.name + PARTIAL)
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / SHARDS).mkdir(parents=True)
        _barrier()
        tensors, plain = _sharded_state(model, optimizations)
        extra = {name: _sharded_extra(value, tensors, name) for name, value in snapshot.extra.items()}
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp / SHARDS), save_distributed=True),
                 no_dist=not dist.is_initialized())
        rngs = [None] * world
        if dist.is_initialized():
            dist.all_gather_object(rngs, capture_rng())
        else:
            rngs = [capture_rng()]
        if rank == 0:
            state = TrainingState(step=snapshot.step, losses=snapshot.losses, optimizers=plain,
                                  schedulers=snapshot.schedulers, rng={"world_size": world, "ranks": rngs},
                                  data=snapshot.data, extra=extra, config=snapshot.config)
            save_training_state(tmp, state)
            (tmp / MODEL_JSON).write_text(json.dumps({"family": model.family, "config": config_to_dict(model.config)}),
                                          encoding="utf-8")
            if tokenizer is not None:
                tokenizer.save(tmp)
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
            write_text_atomic(root / LATEST_FILE, folder.name + "\n")
            if keep > 0:
                for old in self.candidates(root)[keep:]:
                    shutil.rmtree(old)
        _barrier()
        return folder

    def restore(self, candidates: list[Path], model: nn.Module, optimizations: dict[str, Optimization],
                extra: dict[str, Any]) -> tuple[Path, TrainingState]:
        """Load the newest candidate into the (possibly sharded) model, optimizers and extra
        state, at this run's world size; restore or re-seed the RNGs. Returns (folder, state)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageReader
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, set_model_state_dict, set_optimizer_state_dict,
        )

        folder = candidates[0]
        saved = load_training_state(folder)
        if set(saved.optimizers) != set(optimizations) or set(saved.extra) != set(extra):
            raise CheckpointError(f"{folder} holds optimizers {sorted(saved.optimizers)} and extra state "
                                  f"{sorted(saved.extra)}; this run has {sorted(optimizations)} and {sorted(extra)}")
        tensors, _ = _sharded_state(model, optimizations)
        states = {name: _load_targets(saved.extra[name], value.state_dict(), tensors, f"extra state {name!r}")
                  for name, value in extra.items()}
        try:
            dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(folder / SHARDS)),
                     no_dist=not dist.is_initialized())
        except (RuntimeError, ValueError, KeyError, OSError) as err:
            raise CheckpointError(f"{folder / SHARDS} does not fit this model ({err})") from None
        weights = {k[len(MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
        # strict=False: tied names (lm_head = embed_tokens) load through their first name; a name
        # missing from the checkpoint already failed in dcp.load above.
        set_model_state_dict(model, weights, options=StateDictOptions(strict=False))
        for name, o in optimizations.items():
            if PLAIN in saved.optimizers[name]:
                o.optimizer.load_state_dict(saved.optimizers[name][PLAIN])
            else:
                prefix = f"{OPTIM_PREFIX}{name}."
                flat = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                flat.update(saved.optimizers[name])
                set_optimizer_state_dict(model, o.optimizer, flat, options=_options())
            keep_implementation(o.optimizer)
            if o.scheduler is not None:
                o.scheduler.load_state_dict(saved.schedulers[name])
        for name, value in extra.items():
            value.load_state_dict(states[name])
        rank, world = _rank_world()
        if saved.rng["world_size"] == world:
            restore_rng(saved.rng["ranks"][rank])
        else:
            _reseed(self.seed, saved.step, rank)
        return folder, saved


def _reseed(seed: int, step: int, rank: int) -> None:
    """Seed the python, numpy and torch RNGs from (seed, step, rank): a run resumed at another world
    size has no saved state for its ranks, and the ranks must not share one."""
    import random

    value = int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def is_sharded_checkpoint(folder: Path) -> bool:
    """Whether `folder` is a complete sharded training checkpoint (shards + model.json + trainer state)."""
    folder = Path(folder)
    return (folder.name.startswith("step-") and folder.name[5:].isdigit() and (folder / SHARDS).is_dir()
            and all((folder / name).is_file() for name in (MODEL_JSON, STATE_JSON, STATE_TENSORS)))


def holds_sharded_checkpoints(root: Path) -> bool:
    """Whether a run's `checkpoints/` folder holds sharded (DCP) checkpoints."""
    return any(is_sharded_checkpoint(p) for p in Path(root).glob("step-*"))


def build_model(folder: Path) -> nn.Module:
    """A fresh, plain model of the family and config recorded in a sharded checkpoint's model.json."""
    path = Path(folder) / MODEL_JSON
    if not path.is_file():
        raise NotACheckpointError(f"{folder} is not a sharded training checkpoint: it lacks {MODEL_JSON}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        family = get_family(meta["family"])
        config = config_from_mapping(family.config_cls, meta["config"], source=str(path))
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is corrupt ({err})") from None
    return family.build(config)


def read_sharded_weights(folder: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) weights of a sharded checkpoint, read into `model`-shaped tensors in
    this process alone (no process group needed), whatever world size wrote them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    state = model.state_dict()
    first = {_storage_key(value): key for key, value in reversed(list(state.items()))}  # a tied group's first name
    wanted = {MODEL_PREFIX + key: torch.empty_like(value) for key, value in _untied(state).items()}
    try:
        with warnings.catch_warnings():  # DCP warns that it reads in one process: what is asked here
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(wanted, storage_reader=HuggingFaceStorageReader(str(Path(folder) / SHARDS)), no_dist=True)
    except (RuntimeError, ValueError, KeyError, OSError) as err:
        raise CheckpointError(f"{Path(folder) / SHARDS} does not fit the model of {MODEL_JSON} ({err})") from None
    return {key: wanted[MODEL_PREFIX + first[_storage_key(value)]] if value.numel() else wanted[MODEL_PREFIX + key]
            for key, value in state.items()}


def consolidate(folder: str | Path, out: str | Path, *, extra: dict | None = None) -> Path:
    """Convert the sharded training checkpoint `folder` into a polymodal checkpoint folder `out`
    (one safetensors file per part, config.json, tokenizer) that `polymodal.load` reads."""
    folder = Path(folder)
    if not is_sharded_checkpoint(folder):
        raise NotACheckpointError(f"{folder} is not a complete sharded training checkpoint "
                                  f"(it needs {SHARDS}/, {MODEL_JSON}, {STATE_JSON} and {STATE_TENSORS})")
    model = build_model(folder)
    load_state_dict_checked(model, read_sharded_weights(folder, model), source=str(folder / SHARDS))
    tokenizer = None
    if (folder / TOKENIZER_FILE).is_file():
        from polymodal.tokenizers.text import TextTokenizer

        tokenizer = TextTokenizer.from_pretrained(folder)
    step = load_training_state(folder).step
    return save_checkpoint(model, out, tokenizer, extra={"step": step, **(extra or {})})
