"""LLaVA conversation and COCO captions readers: valid records, bad records skipped or raised."""

import json
import logging

import pytest

from polymodal.data.formats import CaptionPair, CocoCaptionsReader, LlavaReader
from polymodal.data.loading import DataError


@pytest.fixture
def image_root(tmp_path, make_photo):
    """A folder with images a.png, b.png, c.png and an image outside it."""
    root = tmp_path / "images"
    root.mkdir()
    for i, name in enumerate("abc"):
        make_photo(16, 12, i).save(root / f"{name}.png")
    make_photo(8, 8).save(tmp_path / "secret.png")
    return root


def _turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


GOOD = [
    {"id": "one", "image": "a.png", "conversations": _turns("<image>\nWhat is it?", "A disc.")},
    {"id": 2, "images": ["a.png", "b.png"], "conversations": _turns("<image> vs <image>?", "Same.", "Sure?", "Yes.")},
    {"id": "text", "conversations": _turns("Hello", "Hi there")},
]
BAD = [
    ("record is a list", ["not", "a", "record"]),
    ("missing field 'id'", {"image": "a.png", "conversations": _turns("<image>", "x")}),
    (
        "1 <image> placeholder\\(s\\) for 2 image",
        {"id": 5, "images": ["a.png", "b.png"], "conversations": _turns("<image>", "x")},
    ),
    ("expected user", {"id": 6, "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}),
    ("last turn is from the user", {"id": 7, "conversations": _turns("a", "b", "c")}),
    ("expected 'human' or 'gpt'", {"id": 8, "conversations": [{"from": "bot", "value": "x"}]}),
    ("escapes the dataset root", {"id": 9, "image": "../secret.png", "conversations": _turns("<image>", "x")}),
    ("absolute", {"id": 10, "image": "/etc/passwd", "conversations": _turns("<image>", "x")}),
    ("not found", {"id": 11, "image": "missing.png", "conversations": _turns("<image>", "x")}),
    (
        "both 'image' and 'images'",
        {"id": 12, "image": "a.png", "images": ["a.png"], "conversations": _turns("<image>", "x")},
    ),
]


def test_llava_reads_valid_records(tmp_path, image_root):
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(GOOD))
    records = list(LlavaReader(path, image_root))
    assert [r.id for r in records] == ["one", "2", "text"]
    assert records[0].images == [(image_root / "a.png").resolve()]
    assert records[0].messages == [
        {"role": "user", "content": "<image>\nWhat is it?"},
        {"role": "assistant", "content": "A disc."},
    ]
    assert [p.name for p in records[1].images] == ["a.png", "b.png"] and len(records[1].messages) == 4
    assert records[2].images == []


@pytest.mark.parametrize("reason,bad", BAD, ids=[b[0][:20] for b in BAD])
def test_llava_bad_record_in_the_middle_is_skipped_then_strict_raises(tmp_path, image_root, caplog, reason, bad):
    path = tmp_path / "llava.json"
    path.write_text(json.dumps([GOOD[0], bad, GOOD[2]]))
    reader = LlavaReader(path, image_root)
    with caplog.at_level(logging.WARNING, logger="polymodal.data"):
        assert [r.id for r in reader] == ["one", "text"]
    assert reader.skipped.count == 1
    assert "llava.json: record 1:" in caplog.text
    with pytest.raises(DataError, match=f"llava.json: record 1: .*{reason}"):
        list(LlavaReader(path, image_root, strict=True))


def test_llava_jsonl_skips_malformed_lines(tmp_path, image_root):
    path = tmp_path / "llava.jsonl"
    lines = [json.dumps(GOOD[0]), '{"id": "broken", "conver', "", json.dumps(GOOD[1])]
    path.write_text("\n".join(lines) + "\n")
    reader = LlavaReader(path, image_root)
    assert [r.id for r in reader] == ["one", "2"]
    assert reader.skipped.count == 1 and "line 2" in reader.skipped.reasons[0]
    with pytest.raises(DataError, match="llava.jsonl: line 2: not valid JSON"):
        list(LlavaReader(path, image_root, strict=True))


def test_llava_unparsable_file_names_it(tmp_path, image_root):
    path = tmp_path / "broken.json"
    path.write_text('[{"id": 1,')
    with pytest.raises(DataError, match="broken.json: not valid JSON"):
        list(LlavaReader(path, image_root))
    with pytest.raises(DataError, match="absent.json: file not found"):
        list(LlavaReader(tmp_path / "absent.json", image_root))


def _coco(images, annotations):
    return {"images": images, "annotations": annotations}


def test_coco_records_and_per_caption_pairs(tmp_path, image_root):
    path = tmp_path / "captions.json"
    data = _coco(
        [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
        [
            {"id": 10, "image_id": 2, "caption": "b first"},
            {"id": 11, "image_id": 1, "caption": "a first"},
            {"id": 12, "image_id": 2, "caption": "b second"},
        ],
    )
    path.write_text(json.dumps(data))
    records = list(CocoCaptionsReader(path, image_root))
    assert [(r.image_id, r.image.name, r.captions) for r in records] == [
        (1, "a.png", ["a first"]),
        (2, "b.png", ["b first", "b second"]),
    ]
    pairs = list(CocoCaptionsReader(path, image_root, per_caption=True))
    assert pairs == [
        CaptionPair(1, (image_root / "a.png").resolve(), "a first"),
        CaptionPair(2, (image_root / "b.png").resolve(), "b first"),
        CaptionPair(2, (image_root / "b.png").resolve(), "b second"),
    ]


def test_coco_bad_entries_skipped_and_counted(tmp_path, image_root, caplog):
    path = tmp_path / "captions.json"
    data = _coco(
        [
            {"id": 1, "file_name": "a.png"},
            {"id": 2, "file_name": "../secret.png"},
            {"id": 3, "file_name": "missing.png"},
            {"id": 1, "file_name": "b.png"},
            {"id": 4, "file_name": "c.png"},
        ],
        [
            {"image_id": 1, "caption": "fine"},
            {"image_id": 99, "caption": "orphan"},
            {"image_id": 1, "caption": "   "},
            "junk",
        ],
    )
    path.write_text(json.dumps(data))
    reader = CocoCaptionsReader(path, image_root)
    with caplog.at_level(logging.WARNING, logger="polymodal.data"):
        records = list(reader)
    assert [(r.image_id, r.captions) for r in records] == [(1, ["fine"])]
    # images[1] escapes, images[2] missing, images[3] duplicate id, 3 bad annotations, id 4 uncaptioned
    assert reader.skipped.count == 7
    for where in [
        "images[1]",
        "images[2]",
        "images[3]",
        "annotations[1]",
        "annotations[2]",
        "annotations[3]",
        "image id 4",
    ]:
        assert f"captions.json: {where}" in caplog.text
    with pytest.raises(DataError, match=r"captions.json: images\[1\]: .*escapes"):
        list(CocoCaptionsReader(path, image_root, strict=True))
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="field 'annotations' must be a list"):
        list(CocoCaptionsReader(path, image_root))
