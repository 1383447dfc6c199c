"""Build and load polymodal's fused CPU kernels on first use.

`fused_cpu()` compiles `fused_cpu.cpp` with torch.utils.cpp_extension (a C++ compiler and ninja;
about half a minute, once: later processes load the cached library from torch's extensions
folder, `TORCH_EXTENSIONS_DIR`) and returns the module; or None where the kernels cannot be
had: POLYMODAL_FUSED_CPU=0 (silently), a CPU without AVX2 or a failed build (one warning line).
Callers then run the same maths in plain PyTorch, so nothing but speed depends on the build.
`plain_pytorch()` turns the kernels off for a block of code (benchmarks time both paths).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch

SOURCE = Path(__file__).with_name("fused_cpu.cpp")
log = logging.getLogger("polymodal.kernels")
# The kernels use at::vec at eight float lanes; AVX-512 machines run AVX2 code too.
SUPPORTED_CAPABILITIES = ("AVX2", "AVX512")
# torch's build lock (`lock` in the build folder) is waited on forever; a build takes about a
# minute, so a lock this old was left by an interrupted one.
STALE_LOCK_SECONDS = 15 * 60
AVX2_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]


_plain_depth = 0  # > 0 inside `plain_pytorch()`


def enabled_by_environment() -> bool:
    """False when the user turned the kernels off with POLYMODAL_FUSED_CPU=0."""
    return os.environ.get("POLYMODAL_FUSED_CPU", "1") != "0"


@contextlib.contextmanager
def plain_pytorch() -> Iterator[None]:
    """Inside this block every op of `polymodal.kernels` runs in plain PyTorch (benchmarks time both)."""
    global _plain_depth
    _plain_depth += 1
    try:
        yield
    finally:
        _plain_depth -= 1


def kernels() -> ModuleType | None:
    """`fused_cpu()`, or None inside `plain_pytorch()`."""
    return None if _plain_depth else fused_cpu()


def _build_source() -> tuple[str, Path]:
    """(module name, source path) in a build folder named by a digest of the source, flags, Python and torch.

    ninja rebuilds whenever the source's path changes, so the source is copied into that folder:
    every checkout of the same kernels (a second clone, the mutation check's copies) then shares
    one build, and a changed source gets a folder of its own.
    """
    from torch.utils.cpp_extension import get_default_build_root

    text = SOURCE.read_bytes()
    key = b"\0".join([text, " ".join(AVX2_FLAGS).encode(), sys.version.encode(), torch.__version__.encode()])
    name = f"polymodal_fused_cpu_{hashlib.sha256(key).hexdigest()[:12]}"
    folder = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / name
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
        warnings.warn(f"removing {lock}, left by a kernel build interrupted over {STALE_LOCK_SECONDS // 60} "
                      "minutes ago", stacklevel=3)
        lock.unlink(missing_ok=True)
    source = folder / SOURCE.name
    if not source.exists() or source.read_bytes() != text:
        partial = folder / f".{SOURCE.name}.{os.getpid()}"
        partial.write_bytes(text)
        partial.replace(source)  # atomic: a concurrent process never compiles half a file
    return name, source


@functools.cache
def fused_cpu() -> ModuleType | None:
    """The compiled kernel module, built on the first call; None where it cannot be built or is off."""
    if not enabled_by_environment():
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in SUPPORTED_CAPABILITIES:
        warnings.warn(f"polymodal fused CPU kernels need AVX2 (this CPU offers {capability}); using plain PyTorch",
                      stacklevel=2)
        return None
    from torch.utils.cpp_extension import load

    log.info("loading polymodal's fused CPU kernels (the first time builds them: about a minute)")
    try:
        name, source = _build_source()
        return load(name=name, sources=[str(source)], extra_cflags=AVX2_FLAGS, build_directory=str(source.parent),
                    verbose=False)
    except Exception as err:  # no compiler, no ninja, a read-only cache folder: fall back, say why in one line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(f"polymodal fused CPU kernels could not be built ({reason}); using plain PyTorch "
                      "(set POLYMODAL_FUSED_CPU=0 to skip the attempt)", stacklevel=2)
        return None
