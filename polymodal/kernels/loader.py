"""Build and load polymodal's fused CPU kernels on first use.

`fused_cpu()` compiles `fused_cpu.cpp`, `attention_cpu.cpp` and `mlp_cpu.cpp` into one module
with torch.utils.cpp_extension (a C++ compiler and ninja; about a minute, once: later processes
load the cached library from torch's extensions folder, `TORCH_EXTENSIONS_DIR`) and returns the
module; or None where the kernels cannot be had: POLYMODAL_FUSED_CPU=0 (silently), a CPU without
AVX2 or a failed build (one warning line).
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

# One extension module: fused_cpu.cpp holds the bindings of every file; the headers are shared.
SOURCES = [Path(__file__).with_name(name)
           for name in ("fused_cpu.cpp", "attention_cpu.cpp", "mlp_cpu.cpp", "cpu_blas.h", "vec_math.h")]
log = logging.getLogger("polymodal.kernels")
# The kernels use at::vec at eight float lanes; AVX-512 machines run AVX2 code too.
SUPPORTED_CAPABILITIES = ("AVX2", "AVX512")
# torch's build lock (`lock` in the build folder) is waited on forever; a build takes about a
# minute, so a lock this old was left by an interrupted one.
STALE_LOCK_SECONDS = 15 * 60
# -fopenmp: at::parallel_for is an inline OpenMP loop, serial in code compiled without it. Only
# the compile gets the flag; at load time the OpenMP calls bind to the runtime torch already loaded,
# so the kernels share torch's thread pool.
AVX2_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]


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


def _build_sources() -> tuple[str, list[Path]]:
    """(module name, source paths) in a build folder named by a digest of the sources, flags, Python and torch.

    ninja rebuilds whenever a source's path changes, so the sources are copied into that folder:
    every checkout of the same kernels (a second clone, the mutation check's copies) then shares
    one build, and changed sources get a folder of their own.
    """
    from torch.utils.cpp_extension import get_default_build_root

    texts = [path.read_bytes() for path in SOURCES]
    key = b"\0".join([*texts, " ".join(AVX2_FLAGS).encode(), sys.version.encode(), torch.__version__.encode()])
    name = f"polymodal_fused_cpu_{hashlib.sha256(key).hexdigest()[:12]}"
    folder = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / name
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
        warnings.warn(f"removing {lock}, left by a kernel build interrupted over {STALE_LOCK_SECONDS // 60} "
                      "minutes ago", stacklevel=3)
        lock.unlink(missing_ok=True)
    copies = []
    for path, text in zip(SOURCES, texts):
        copy = folder / path.name
        if not copy.exists() or copy.read_bytes() != text:
            partial = folder / f".{path.name}.{os.getpid()}"
            partial.write_bytes(text)
            partial.replace(copy)  # atomic: a concurrent process never compiles half a file
        copies.append(copy)
    return name, copies


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
        name, sources = _build_sources()
        compiled = [str(path) for path in sources if path.suffix == ".cpp"]
        return load(name=name, sources=compiled, extra_cflags=AVX2_FLAGS, build_directory=str(sources[0].parent),
                    verbose=False)
    except Exception as err:  # no compiler, no ninja, a read-only cache folder: fall back, say why in one line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(f"polymodal fused CPU kernels could not be built ({reason}); using plain PyTorch "
                      "(set POLYMODAL_FUSED_CPU=0 to skip the attempt)", stacklevel=2)
        return None
