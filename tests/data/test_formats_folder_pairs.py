"""Image-folder and image–text pairs (JSONL/CSV) readers."""

import json

import pytest

from polymodal.data.formats import (
    FolderRecord,
    ImageFolderReader,
    PairRecord,
    PairsReader,
)
from polymodal.data.loading import DataError


def test_image_folder_classes_sorted_and_bad_files_skipped(tmp_path, make_photo):
    root = tmp_path / "folder"
    for name in ["dog", "cat"]:
        (root / name).mkdir(parents=True)
        for i in range(2):
            make_photo(8, 8, i).save(root / name / f"{i}.png")
    (root / "cat" / "README.txt").write_text("not an image")
    (root / "cat" / ".DS_Store").write_text("hidden, ignored")
    make_photo(8, 8).save(tmp_path / "outside.png")
    (root / "dog" / "z_link.png").symlink_to(tmp_path / "outside.png")
    reader = ImageFolderReader(root)
    assert reader.classes == ["cat", "dog"]
    records = list(reader)
    assert records == [
        FolderRecord((root / "cat" / "0.png").resolve(), 0, "cat"),
        FolderRecord((root / "cat" / "1.png").resolve(), 0, "cat"),
        FolderRecord((root / "dog" / "0.png").resolve(), 1, "dog"),
        FolderRecord((root / "dog" / "1.png").resolve(), 1, "dog"),
    ]
    assert reader.skipped.count == 2
    assert "cat/README.txt" in reader.skipped.reasons[0] and "escapes" in reader.skipped.reasons[1]
    with pytest.raises(DataError, match="cat/README.txt: not an image"):
        list(ImageFolderReader(root, strict=True))
    with pytest.raises(DataError, match="no class subfolders"):
        ImageFolderReader(root / "cat")


def test_pairs_jsonl_and_csv(tmp_path, make_photo):
    (tmp_path / "img").mkdir()
    for name in "ab":
        make_photo(8, 8).save(tmp_path / "img" / f"{name}.png")
    rows = [
        json.dumps({"image": "img/a.png", "text": "first"}),
        "{broken json",
        json.dumps({"image": "img/b.png", "caption": "uses the caption field"}),
        json.dumps({"image": "img/missing.png", "text": "x"}),
        json.dumps({"image": "../escape.png", "text": "x"}),
        json.dumps({"image": "img/a.png", "text": ""}),
    ]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n".join(rows) + "\n")
    reader = PairsReader(jsonl)
    assert list(reader) == [
        PairRecord((tmp_path / "img" / "a.png").resolve(), "first"),
        PairRecord((tmp_path / "img" / "b.png").resolve(), "uses the caption field"),
    ]
    assert reader.skipped.count == 4
    assert [r.split(": ")[1] for r in reader.skipped.reasons] == ["line 2", "line 4", "line 5", "line 6"]

    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text(
        'file,caption\nimg/a.png,"a caption, with a comma"\nimg/nope.png,gone\nimg/b.png,"two\nlines"\n'
    )
    reader = PairsReader(csv_path, image_key="file", text_key="caption")
    assert [(r.image.name, r.text) for r in reader] == [("a.png", "a caption, with a comma"), ("b.png", "two\nlines")]
    assert reader.skipped.count == 1 and "pairs.csv: line 3" in reader.skipped.reasons[0]
    with pytest.raises(DataError, match="pairs.csv: line 3: image file .*nope.png not found"):
        list(PairsReader(csv_path, image_key="file", text_key="caption", strict=True))
    with pytest.raises(DataError, match="has no column 'image'"):
        list(PairsReader(csv_path))
