"""Fuzzing the file readers: a malformed record of any shape is a counted skip (non-strict) or a
DataError naming the file and record (strict), never a crash; good records are still read."""

import json
import logging
import random

import pytest

from polymodal.data.formats import CocoCaptionsReader, ImageFolderReader, LlavaReader, PairsReader
from polymodal.data.loading import DataError, SkipCounter, iter_jsonl, read_json
from polymodal.errors import PolymodalError

HUGE = "x" * 100_000
DEEP = "[" * 100_000 + "]" * 100_000
# Values of the wrong type for any field: scalars, containers, nesting, unhashables.
WRONG_TYPES = [None, 1.5, True, [], {}, [1, 2], {"a": {"b": [1]}}, [[[[[]]]]]]
# Strings no reader may accept as an image path (each names what it exercises).
BAD_PATHS = ["", "\udcff.png", HUGE, "../secret.png", "/etc/passwd", "a\x00.png", "dir.png", "empty.png",
             "loop.png", "link_out.png", "missing.png"]  # fmt: skip


@pytest.fixture
def root(tmp_path, make_photo):
    """Image root with good a.png/b.png and every kind of bad image entry; a secret outside it."""
    images = tmp_path / "images"
    images.mkdir()
    for i, name in enumerate("ab"):
        make_photo(8, 8, i).save(images / f"{name}.png")
    make_photo(8, 8).save(tmp_path / "secret.png")
    (images / "dir.png").mkdir()  # an "image" that is a directory
    (images / "empty.png").write_bytes(b"")  # a zero-byte image
    (images / "loop.png").symlink_to(images / "loop2.png")
    (images / "loop2.png").symlink_to(images / "loop.png")
    (images / "link_out.png").symlink_to(tmp_path / "secret.png")
    return images


def _turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def _good_llava(i):
    return {"id": f"good{i}", "image": "a.png", "conversations": _turns("<image>\nWhat?", "A disc.")}


def _set(record, path, value):
    """A deep copy of `record` with the field at `path` (keys/indices) set to `value` (or deleted)."""
    record = json.loads(json.dumps(record))
    target = record
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return record


_DELETE = object()


def _llava_mutants():
    """Records that are each malformed in exactly one way (every field, every wrong shape)."""
    base = _good_llava(0)
    fields = {
        ("id",): [*WRONG_TYPES, "\udcff"],
        ("image",): [0, *WRONG_TYPES, ["a.png"], *BAD_PATHS],
        ("conversations",): [0, "hello", *WRONG_TYPES, [None, None], [["human", "x"]]],
        ("conversations", 0): [0, "hello", *WRONG_TYPES, {"from": "human"}, {"value": "<image>"}],
        ("conversations", 0, "from"): [0, *WRONG_TYPES, ["human"], "bot", "gpt"],
        ("conversations", 0, "value"): [0, *WRONG_TYPES, "\udcff<image>", "no placeholder"],
        ("conversations", 1, "value"): [0, *WRONG_TYPES, "\udcff"],
        ("conversations", 1, "from"): [0, *WRONG_TYPES, "human"],
    }
    mutants = [_set(base, path, value) for path, values in fields.items() for value in values]
    mutants += [_set(base, (key,), _DELETE) for key in ("id", "image", "conversations")]
    text_only = {key: value for key, value in base.items() if key != "image"}
    mutants += [{**text_only, "images": bad} for bad in ("a.png", [None], [["a.png"]], {"a": 1}, ["a.png", "b.png"])]
    mutants.append({**base, "images": ["a.png"]})  # both 'image' and 'images'
    return mutants + [0, "record", *WRONG_TYPES[:2], [base]]


def _check_skips(reader, expected_ids, bad_count, caplog):
    """Read everything; returns the skip messages logged (all of them, not just the kept few)."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="polymodal.data"):
        records = list(reader)
    assert [r.id for r in records] == expected_ids
    assert reader.skipped.count == bad_count
    messages = [r.getMessage().split(" in ", 1)[1] for r in caplog.records]
    assert len(messages) == bad_count
    for message in messages:
        assert "\n" not in message and len(message) < 1000  # one line, bad values clipped
    return messages


def test_llava_json_every_malformed_record_is_a_counted_skip(tmp_path, root, caplog):
    mutants = _llava_mutants()
    records = [x for i, m in enumerate(mutants) for x in (_good_llava(i), m)]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    messages = _check_skips(LlavaReader(path, root), [f"good{i}" for i in range(len(mutants))], len(mutants), caplog)
    # Each skip names the file and the record index of its mutant.
    assert [m.split(": ")[:2] for m in messages] == [[str(path), f"record {2 * i + 1}"] for i in range(len(mutants))]


def test_llava_strict_names_file_and_record_for_every_mutant(tmp_path, root):
    path = tmp_path / "one.json"
    for mutant in _llava_mutants():
        path.write_text(json.dumps([_good_llava(0), mutant]))
        with pytest.raises(DataError, match=r"one\.json: record 1: ") as caught:
            list(LlavaReader(path, root, strict=True))
        assert isinstance(caught.value, PolymodalError) and "\n" not in str(caught.value)


def test_llava_jsonl_bad_lines_and_records_are_skipped(tmp_path, root, caplog):
    mutants = _llava_mutants()
    raw_lines = [b"\xff\xfe not utf-8", DEEP.encode(), b"1" * 5000, b'{"id": "\xff"}', b"null", b"[]", b"{"]
    lines = [json.dumps(m).encode() for m in mutants] + raw_lines
    path = tmp_path / "llava.jsonl"
    path.write_bytes(b"\n".join(x for i, line in enumerate(lines) for x in (json.dumps(_good_llava(i)).encode(), line)))
    messages = _check_skips(LlavaReader(path, root), [f"good{i}" for i in range(len(lines))], len(lines), caplog)
    assert [m.split(": ")[1] for m in messages] == [f"line {2 * i + 2}" for i in range(len(lines))]
    for line in lines:
        path.write_bytes(json.dumps(_good_llava(0)).encode() + b"\n" + line)
        with pytest.raises(DataError, match=r"llava\.jsonl: line 2: "):
            list(LlavaReader(path, root, strict=True))
    assert "JSON nested too deeply" in messages[-6]


def test_llava_json_undecodable_bytes_cost_only_their_record(tmp_path, root, caplog):
    records = [_good_llava(0), {**_good_llava(1), "conversations": _turns("<image>@BAD@", "x")}, _good_llava(2)]
    path = tmp_path / "latin1.json"
    path.write_bytes(json.dumps(records).encode().replace(b"@BAD@", b"caf\xe9"))
    messages = _check_skips(LlavaReader(path, root), ["good0", "good2"], 1, caplog)
    assert "latin1.json: record 1: conversations[0].value is not valid UTF-8" in messages[0]


def test_huge_valid_text_is_read_not_skipped(tmp_path, root):
    path = tmp_path / "long.json"
    path.write_text(json.dumps([{"id": 1, "image": "a.png", "conversations": _turns("<image>", HUGE)}]))
    assert [len(r.messages[1]["content"]) for r in LlavaReader(path, root)] == [len(HUGE)]


UNPARSABLE = [DEEP, "[" * 5000 + "]" * 5000, "1" * 5000, '{"a": ']


@pytest.mark.parametrize("text", UNPARSABLE, ids=["deep", "5k", "int", "cut"])
def test_unparsable_json_file_is_one_dataerror_naming_it(tmp_path, root, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DataError, match=r"bad\.json: ") as caught:
        read_json(path)
    assert "\n" not in str(caught.value)
    for reader in (LlavaReader(path, root), CocoCaptionsReader(path, root)):
        with pytest.raises(DataError, match=r"bad\.json: "):
            list(reader)
    with pytest.raises(DataError, match="cannot read file"):
        read_json(tmp_path)  # a directory
    with pytest.raises(DataError, match="cannot read file"):
        list(iter_jsonl(tmp_path, SkipCounter("x")))


def _coco_file(tmp_path, images, annotations):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def test_coco_every_malformed_entry_is_a_counted_skip(tmp_path, root, caplog):
    bad_images = [{"id": v, "file_name": "a.png"} for v in [*WRONG_TYPES, "\udcff"]]
    bad_images += [{"id": 100 + i, "file_name": v} for i, v in enumerate([0, *WRONG_TYPES, *BAD_PATHS])]
    bad_images += ["junk", 3, None, [], {"file_name": "a.png"}, {"id": 1, "file_name": "b.png"}]  # last: duplicate
    bad_anns = [{"image_id": v, "caption": "c"} for v in [*WRONG_TYPES, "1", 99]]
    bad_anns += [{"image_id": 1, "caption": v} for v in [0, "", "   ", "\udcff", *WRONG_TYPES]]
    bad_anns += ["junk", 3, None, [], {"caption": "no image id"}]
    images = [{"id": 1, "file_name": "a.png"}, *bad_images, {"id": "two", "file_name": "b.png"}]
    anns = [{"image_id": 1, "caption": "a"}, *bad_anns, {"image_id": "two", "caption": "b"}]
    reader = CocoCaptionsReader(_coco_file(tmp_path, images, anns), root)
    with caplog.at_level(logging.WARNING, logger="polymodal.data"):
        records = list(reader)
    assert [(r.image_id, r.captions) for r in records] == [(1, ["a"]), ("two", ["b"])]
    assert reader.skipped.count == len(bad_images) + len(bad_anns)
    wheres = [r.getMessage().split(": ")[1] for r in caplog.records]
    assert wheres == [f"images[{i}]" for i in range(1, len(bad_images) + 1)] + [
        f"annotations[{i}]" for i in range(1, len(bad_anns) + 1)
    ]
    assert all("\n" not in r.getMessage() and len(r.getMessage()) < 1000 for r in caplog.records)
    for entry in bad_images:
        path = _coco_file(tmp_path, [images[0], entry], anns[:1])
        with pytest.raises(DataError, match=r"captions\.json: images\[1\]: "):
            list(CocoCaptionsReader(path, root, strict=True))
    for ann in bad_anns:
        path = _coco_file(tmp_path, images[:1], [anns[0], ann])
        with pytest.raises(DataError, match=r"captions\.json: annotations\[1\]: "):
            list(CocoCaptionsReader(path, root, strict=True))


@pytest.mark.parametrize(
    "top,message",
    [([], "top level must be an object"), ({"images": {}, "annotations": []}, "field 'images' must be a list"),
     ({"images": [], "annotations": None}, "field 'annotations' must be a list"), ("text", "top level")],
)  # fmt: skip
def test_coco_wrong_top_level_is_an_error_even_non_strict(tmp_path, root, top, message):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(top))
    with pytest.raises(DataError, match=rf"captions\.json: {message}"):
        list(CocoCaptionsReader(path, root))


def test_pairs_jsonl_every_malformed_row_is_a_counted_skip(tmp_path, root):
    bad = [{"image": v, "text": "t"} for v in [0, *WRONG_TYPES, *BAD_PATHS]]
    bad += [{"image": "a.png", "text": v} for v in [0, "", "  ", "\udcff", *WRONG_TYPES]]
    bad += [{"text": "no image"}, {"image": "a.png"}, [], 3, None, "s"]
    lines = [json.dumps(b).encode() for b in bad] + [b"\xff\xfe", DEEP.encode(), b"1" * 5000, b"{"]
    path = tmp_path / "pairs.jsonl"
    good = json.dumps({"image": "a.png", "text": "good"}).encode()
    path.write_bytes(b"\n".join(x for line in lines for x in (good, line)))
    reader = PairsReader(path, image_root=root)
    assert [r.text for r in reader] == ["good"] * len(lines)
    assert reader.skipped.count == len(lines)
    for i in range(len(lines)):
        path.write_bytes(good + b"\n" + lines[i])
        with pytest.raises(DataError, match=r"pairs\.jsonl: line 2: "):
            list(PairsReader(path, image_root=root, strict=True))


def test_pairs_csv_bad_rows_are_counted_skips(tmp_path, root):
    path = tmp_path / "pairs.csv"
    rows = [
        b"image,text", b"a.png,good one",
        b"b.png",  # a missing column
        b"a.png,caf\xe9",  # not UTF-8
        b"a.png," + b"x" * 200_000,  # over the csv module's field limit
        b"dir.png,a folder", b"empty.png,zero bytes", b"loop.png,a loop", b"../secret.png,escapes", b",no path",
        b"b.png,good two,extra column",
    ]  # fmt: skip
    path.write_bytes(b"\n".join(rows) + b"\n")
    reader = PairsReader(path, image_root=root)
    assert [r.text for r in reader] == ["good one", "good two"]
    assert reader.skipped.count == 8
    assert [r.split(": ")[1] for r in reader.skipped.reasons] == [f"line {n}" for n in range(3, 11)]
    with pytest.raises(DataError, match=r"pairs\.csv: line 3: field 'text' is missing"):
        list(PairsReader(path, image_root=root, strict=True))
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"pairs\.csv: empty file"):
        list(PairsReader(path, image_root=root))
    path.write_bytes(b"file,caption\na.png,x\n")
    with pytest.raises(DataError, match=r"pairs\.csv: header \['file', 'caption'\] has no column 'image'"):
        list(PairsReader(path, image_root=root))


def test_image_folder_bad_entries_are_counted_skips(tmp_path, make_photo):
    classes = tmp_path / "classes"
    (classes / "cat").mkdir(parents=True)
    make_photo(8, 8).save(classes / "cat" / "good.png")
    (classes / "cat" / "dir.png").mkdir()
    (classes / "cat" / "empty.png").write_bytes(b"")
    (classes / "cat" / "loop.png").symlink_to(classes / "cat" / "loop.png")
    (classes / "cat" / "dangling.png").symlink_to(classes / "cat" / "gone.png")
    make_photo(8, 8).save(tmp_path / "secret.png")
    (classes / "dog").symlink_to(tmp_path, target_is_directory=True)  # a class folder leading outside
    reader = ImageFolderReader(classes)
    assert [r.image.name for r in reader] == ["good.png"]
    reasons = " | ".join(reader.skipped.reasons)
    for culprit in ["cat/dangling.png: image file", "cat/dir.png: image file", "not a regular file",
                    "cat/empty.png: image file", "is empty", "cat/loop.png", "dog/secret.png", "escapes"]:  # fmt: skip
        assert culprit in reasons
    assert reader.skipped.count == 6  # dangling, dir, empty, loop, and dog's secret.png + its classes/ folder entry
    with pytest.raises(DataError, match=r"classes: cat/dangling\.png: image file .* not found"):
        list(ImageFolderReader(classes, strict=True))


def test_image_folder_class_list(tmp_path, make_photo):
    root = tmp_path / "root"
    (root / "b").mkdir(parents=True)
    make_photo(8, 8).save(root / "b" / "1.png")
    (root / "classes.txt").write_text("c\nb\n\na\n")
    reader = ImageFolderReader(root)
    assert reader.classes == ["c", "b", "a"] and [(r.label, r.class_name) for r in reader] == [(1, "b")]
    assert reader.skipped.count == 0  # classes without a folder simply have no images
    for text, message in [
        ("c\nb\nc\n", "line 3: class 'c' is a duplicate"),
        ("../b\nb\n", "line 1: class '../b' is not"),
        ("a\n", r"class folder\(s\) \['b'\] are not listed"),
    ]:
        (root / "classes.txt").write_text(text)
        with pytest.raises(DataError, match=rf"classes\.txt: {message}"):
            ImageFolderReader(root)


def test_random_structures_never_crash(tmp_path, root):
    """Seeded random JSON values in random fields: every record is read or skipped, none crash."""
    rng = random.Random(0)

    def value(depth=0):
        kinds = ["none", "int", "float", "bool", "str", "path", "list", "dict"][: 8 if depth < 4 else 6]
        kind = rng.choice(kinds)
        return {
            "none": None, "int": rng.randint(-5, 5), "float": rng.random(), "bool": rng.random() < 0.5,
            "str": rng.choice(["", "x", "<image>", "human", "gpt", "\udcff", HUGE[: rng.randint(0, 5000)]]),
            "path": rng.choice(["a.png", "b.png", *BAD_PATHS]),
            "list": [value(depth + 1) for _ in range(rng.randint(0, 3))] if kind == "list" else None,
            "dict": {rng.choice(["id", "image", "from", "value", "caption", "x"]): value(depth + 1)
                     for _ in range(rng.randint(0, 3))} if kind == "dict" else None,
        }[kind]  # fmt: skip

    keys = ["id", "image", "images", "conversations", "text", "caption", "file_name", "image_id"]
    records = [{rng.choice(keys): value() for _ in range(rng.randint(0, 4))} for _ in range(300)]
    llava, pairs = tmp_path / "r.jsonl", tmp_path / "p.jsonl"
    llava.write_text("\n".join(json.dumps(r) for r in records))
    pairs.write_text(llava.read_text())
    for reader in (LlavaReader(llava, root), PairsReader(pairs, image_root=root)):
        assert len(list(reader)) + reader.skipped.count == len(records)
    coco = _coco_file(tmp_path, records[:150], records[150:])
    reader = CocoCaptionsReader(coco, root)
    list(reader)
    assert reader.skipped.count >= 1
