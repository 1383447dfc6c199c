"""Atomic writes: a file or a whole folder appears complete, or not at all.

Folders are filled in a hidden temporary sibling, fsynced, and swapped in by two renames (old
folder aside, new one in, old one removed). A crash between the renames leaves the previous
folder as a `.name.old-*` sibling, which `recover_interrupted_swap` (run before every write and
by readers) moves back.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator


@contextlib.contextmanager
def atomic_folder(folder: str | Path, is_complete: Callable[[Path], bool] = lambda p: p.is_dir()) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces `folder` as a whole.

    On an exception the temporary folder is removed and `folder` is untouched. `is_complete`
    tells a usable leftover `.old-*` copy from a partial one during recovery.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_swap(folder, is_complete)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(folder, old)
        os.rename(tmp, folder)
        fsync_dir(folder.parent)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_interrupted_swap(folder: str | Path, is_complete: Callable[[Path], bool] = lambda p: p.is_dir()) -> None:
    """Undo what an interrupted `atomic_folder` left next to `folder`.

    A complete `.name.old-*` copy with no `folder` means the swap died between its renames: move
    it back. Leftover `.name.tmp-*` folders are incomplete writes and are removed.
    """
    folder = Path(folder)
    olds = sorted(p for p in folder.parent.glob(f".{folder.name}.old-*") if is_complete(p))
    if olds and not folder.exists():
        os.rename(olds[0], folder)
    for stale in [*folder.parent.glob(f".{folder.name}.tmp-*"), *folder.parent.glob(f".{folder.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a small text file atomically (temp file, fsync, rename over the old one)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root` to disk before it is renamed into place, giving
    each file the process's usual mode (some writers, safetensors among them, create files 0600)."""
    mode = 0o666 & ~_umask()
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            os.chmod(os.path.join(dirpath, filename), mode)
            fd = os.open(os.path.join(dirpath, filename), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def _umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    """fsync a directory so renames/creations inside it survive a power loss (POSIX only)."""
    if os.name != "posix":
        return
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
