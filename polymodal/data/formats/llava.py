"""LLaVA conversation data: `[{"id", "image" | "images", "conversations": [{"from", "value"}]}]`.

This is the format of LLaVA-Instruct / LLaVA-1.5 mix and most visual instruction data sets. Each
record holds zero (text-only), one (`"image": "coco/000.jpg"`) or several (`"images": [...]`)
image paths relative to an image root, and turns alternating `"from": "human"` and `"gpt"`;
`<image>` placeholders in the turns mark where each image goes, in order.

The reader accepts a JSON array (`.json`) or one record per line (`.jsonl`, where a malformed
line is skipped on its own). Bad records (wrong fields or a value of the wrong type in any
field, roles out of order, placeholder count different from image count, text that is not valid
UTF-8, a path escaping the root, a missing, empty or non-regular image file) are skipped with a
counted warning naming the file and record index, or raise in strict mode. Ids are labels, not
keys: a repeated id is read like any other record.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from polymodal.data.conversation import IMAGE_MARKER
from polymodal.data.image import check_image_file, resolve_under
from polymodal.data.loading import (
    DataError,
    SkipCounter,
    check_text,
    describe,
    iter_jsonl,
    read_json,
    short_repr,
    skip_bad,
)

# LLaVA files name the speakers "human"/"gpt"; some derived sets already use chat roles.
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class ConversationRecord:
    """One LLaVA sample.

    Attributes:
        id: the record's "id" as a string.
        images: resolved absolute image paths, in placeholder order (empty for text-only).
        messages: `[{"role": "user" | "assistant", "content": str}]`, user first, alternating.
    """

    id: str
    images: list[Path] = field(default_factory=list)
    messages: list[dict[str, str]] = field(default_factory=list)


def parse_llava_record(raw: object, image_root: str | Path, check_files: bool = True) -> ConversationRecord:
    """Validate one raw JSON record and turn it into a `ConversationRecord`.

    Every field is type-checked before use, so a record of any shape is a `DataError`, never a
    crash: the reader skips it (counted) or, in strict mode, raises naming the file and record.

    Raises:
        DataError: naming the offending field.
    """
    if not isinstance(raw, dict):
        raise DataError(f"record is a {type(raw).__name__}, expected an object")
    if "id" not in raw:
        raise DataError("missing field 'id'")
    record_id = raw["id"]
    if isinstance(record_id, bool) or not isinstance(record_id, (int, str)):
        raise DataError(f"'id' must be a string or an integer, got {describe(record_id)}")
    check_text(str(record_id), "'id'")
    paths = _image_paths(raw)
    messages = _messages(raw.get("conversations"))
    placeholders = sum(m["content"].count(IMAGE_MARKER) for m in messages)
    if placeholders != len(paths):
        raise DataError(f"{placeholders} {IMAGE_MARKER} placeholder(s) for {len(paths)} image(s)")
    images = [resolve_under(image_root, p) for p in paths]
    if check_files:
        for full in images:
            check_image_file(full)
    return ConversationRecord(id=str(record_id), images=images, messages=messages)


def _image_paths(raw: dict) -> list[str]:
    """The record's image paths, from `"image": str` or `"images": [str, ...]` (none: text-only)."""
    if "image" in raw and "images" in raw:
        raise DataError("has both 'image' and 'images'; use one")
    paths = raw["images"] if "images" in raw else [raw["image"]] if "image" in raw else []
    if not isinstance(paths, list):
        raise DataError(f"'images' must be a list of path strings, got {describe(paths)}")
    for i, path in enumerate(paths):
        if not isinstance(path, str) or not path:
            raise DataError(
                f"'image'/'images' must be a non-empty path string or a list of them (images[{i}] is {describe(path)})"
            )
        check_text(path, f"images[{i}]")
    return paths


def _messages(turns: object) -> list[dict[str, str]]:
    """Chat messages of a `conversations` list: user first, alternating, ending with the assistant."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"'conversations' must be a non-empty list, got {describe(turns)}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(f"conversations[{i}] must be an object with a string 'value', got {describe(turn)}")
        speaker = turn.get("from")
        # Checked for str first: a list or dict "from" is unhashable and would crash the lookup.
        role = ROLE_NAMES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise DataError(f"conversations[{i}].from is {short_repr(speaker)}, expected 'human' or 'gpt'")
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise DataError(
                f"conversations[{i}] is from {role}, expected {expected} (turns must alternate, user first)"
            )
        messages.append({"role": role, "content": check_text(turn["value"], f"conversations[{i}].value")})
    if messages[-1]["role"] != "assistant":
        raise DataError("the last turn is from the user; a sample must end with an assistant answer")
    return messages


class LlavaReader:
    """Iterate `ConversationRecord`s from a LLaVA `.json` (array) or `.jsonl` file.

    Args:
        path: the conversation file.
        image_root: folder the image paths are relative to (default: the file's folder).
        strict: raise `DataError` on the first bad record instead of skipping it.
        check_files: skip records whose image files do not exist (one `stat` per image).

    Attributes:
        skipped: `SkipCounter` of the last iteration (`skipped.count`, `skipped.reasons`).
    """

    def __init__(
        self, path: str | Path, image_root: str | Path | None = None, strict: bool = False, check_files: bool = True
    ):
        self.path = Path(path)
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.strict = strict
        self.check_files = check_files
        self.skipped = SkipCounter(self.path, strict)

    def __iter__(self) -> Iterator[ConversationRecord]:
        self.skipped = SkipCounter(self.path, self.strict)
        rows = iter_jsonl(self.path, self.skipped) if self.path.suffix == ".jsonl" else _json_rows(self.path)
        yield from skip_bad(rows, lambda raw: parse_llava_record(raw, self.image_root, self.check_files), self.skipped)


def _json_rows(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) pairs of a JSON array file; a file that does not parse is an error, not a skip."""
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: top level is a {type(data).__name__}, expected a list of records")
    for i, raw in enumerate(data):
        yield f"record {i}", raw
