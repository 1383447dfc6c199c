"""Output folders that never lose what polymodal did not write.

Every command that writes a folder of results (`world export`, `convert`, `train`, `quickstart`)
goes through `claim_folder`: it refuses a non-empty folder that is not the same command's earlier
output unless `overwrite` is given, and the manifest it keeps in the folder
(`.polymodal-manifest.json`: which command wrote which files) is what an overwrite may remove —
files polymodal did not write are never deleted, and never written over.

    manifest = claim_folder(out, "world export", overwrite=args.overwrite)
    path = manifest.claim("llava.json")       # refuses a foreign file of that name
    ...write path...
    manifest.save()                           # after every file is written
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from polymodal.atomic import write_text_atomic
from polymodal.errors import DestinationExistsError

MANIFEST_FILE = ".polymodal-manifest.json"


@dataclass
class Manifest:
    """The files one command wrote into `folder` (relative POSIX paths)."""

    folder: Path
    writer: str
    files: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._claimed = set(self.files)  # O(1) membership: an export may claim many thousands of files

    def claim(self, relative: str | Path) -> Path:
        """The path of a file (or a whole folder) this command is about to write; refuses one that
        exists and that polymodal did not write (an earlier run's claims were removed by
        `claim_folder`). A claimed folder is the command's own, and an overwrite removes it whole."""
        name = Path(relative).as_posix()
        path = self.folder / name
        claimed = name in self._claimed
        if (path.exists() or path.is_symlink()) and not claimed:
            raise DestinationExistsError(f"{path} exists and was not written by polymodal {self.writer}; "
                                         "move it away or choose another output folder")
        if not claimed:
            self.files.append(name)
            self._claimed.add(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def save(self) -> None:
        """Write the manifest (atomically) into the folder."""
        self.folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"writer": self.writer, "files": sorted(self.files)}, indent=1) + "\n"
        write_text_atomic(self.folder / MANIFEST_FILE, text)


def read_manifest(folder: str | Path) -> Manifest | None:
    """The manifest a polymodal command left in `folder`, or None (no manifest, or not one of ours)."""
    folder = Path(folder)
    try:
        record = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
        writer, files = record["writer"], record["files"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    if not isinstance(writer, str) or not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    # A manifest names files inside its folder only: an edited one cannot make us delete elsewhere.
    safe = [f for f in files if not Path(f).is_absolute() and ".." not in Path(f).parts]
    return Manifest(folder, writer, safe)


def claim_folder(folder: str | Path, writer: str, overwrite: bool = False) -> Manifest:
    """Make `folder` ready for `writer`'s output and return its (empty) manifest.

    An absent or empty folder is fine. A folder holding `writer`'s earlier output is refused unless
    `overwrite`, which removes exactly the files that output's manifest lists (and folders left
    empty by that). A non-empty folder holding anything else is refused unless `overwrite`; its
    files stay untouched and are never written over (`Manifest.claim`).
    Raises `DestinationExistsError` naming the folder and the flag that allows it.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DestinationExistsError(f"{folder} is a file; {writer} writes a folder there")
    previous = read_manifest(folder) if folder.is_dir() else None
    if previous is not None and previous.writer != writer:
        previous = None  # another command's output: treat as foreign, keep it all
    foreign = folder.is_dir() and any(p.name != MANIFEST_FILE for p in folder.iterdir())
    if foreign and not overwrite:
        what = f"an earlier {writer} output" if previous is not None else "files polymodal did not write"
        raise DestinationExistsError(f"{folder} already holds {what}; pass --overwrite to "
                                     f"{'replace it' if previous is not None else 'write beside them'}, "
                                     "or choose another output folder")
    if previous is not None:
        _remove_listed(folder, previous.files)
    return Manifest(folder, writer)


def _remove_listed(folder: Path, files: list[str]) -> None:
    """Delete the listed files under `folder`, then the folders that leaves empty (deepest first)."""
    parents: set[Path] = set()
    for name in files:
        path = folder / name
        if path.is_file() or path.is_symlink():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        parents.update(p for p in path.parents if p != folder and folder in p.parents)
    for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        if parent.is_dir() and not any(parent.iterdir()):
            os.rmdir(parent)
    (folder / MANIFEST_FILE).unlink(missing_ok=True)
