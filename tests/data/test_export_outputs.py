"""`world export` output folders: never lose or overwrite a file polymodal did not write, leave no
stale files of an earlier export, and refuse bad arguments before doing any work."""

import argparse
import json

import pytest

import polymodal.data.export as export
from polymodal.data.export import add_cli, export_world
from polymodal.data.formats import ImageFolderReader, LlavaReader, WebDatasetReader
from polymodal.data.world import SHAPES, SPLITS
from polymodal.data.world.render import MIN_IMAGE_SIZE
from polymodal.errors import DestinationExistsError, UsageError
from polymodal.outputs import MANIFEST_FILE

SMALL = {"image_size": 16}


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_foreign_folder_refused_then_written_beside_with_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DestinationExistsError, match=rf"{tmp_path} already holds files polymodal did not write; "
                                                     "pass --overwrite"):  # fmt: skip
        export_world("llava", tmp_path, 2, **SMALL)
    assert _files(tmp_path) == ["notes.txt"]  # nothing written
    export_world("llava", tmp_path, 2, overwrite=True, **SMALL)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert len(list(LlavaReader(tmp_path / "llava.json"))) == 2


@pytest.mark.parametrize("fmt,taken", [("llava", "llava.json"), ("coco", "captions.json"), ("llava", "images"),
                                       ("webdataset", "shard-000000.tar"), ("folder", "classes.txt")])  # fmt: skip
def test_a_foreign_file_is_never_written_over(tmp_path, fmt, taken):
    (tmp_path / taken).write_text("not polymodal's")
    with pytest.raises(DestinationExistsError, match=rf"{taken} exists and was not written by polymodal world export"):
        export_world(fmt, tmp_path, 3, overwrite=True, **SMALL)
    assert (tmp_path / taken).read_text() == "not polymodal's"
    assert list(tmp_path.iterdir()) == [tmp_path / taken]  # every name is checked before anything is made


def test_reexport_needs_overwrite_and_leaves_no_stale_shards(tmp_path):
    (tmp_path / "README").write_text("keep me")
    export_world("webdataset", tmp_path, 7, shard_size=2, overwrite=True, **SMALL)
    assert len(list(tmp_path.glob("shard-*.tar"))) == 4
    with pytest.raises(DestinationExistsError, match="already holds an earlier world export output; pass --overwrite"):
        export_world("webdataset", tmp_path, 3, shard_size=2, **SMALL)
    pattern = export_world("webdataset", tmp_path, 3, shard_size=2, overwrite=True, **SMALL)
    assert sorted(p.name for p in tmp_path.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert len(list(WebDatasetReader(pattern, strict=True))) == 3
    assert (tmp_path / "README").read_text() == "keep me"
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert manifest["writer"] == "world export" and manifest["files"] == ["shard-000000.tar", "shard-000001.tar"]


def test_reexport_in_another_format_replaces_the_earlier_one(tmp_path):
    export_world("coco", tmp_path, 4, **SMALL)
    (tmp_path / "images" / "user.png").write_bytes(b"a foreign file inside our folder")
    export_world("llava", tmp_path, 2, overwrite=True, **SMALL)
    assert _files(tmp_path) == [MANIFEST_FILE, "images/train-000000.png", "images/train-000001.png",
                                "images/user.png", "llava.json"]  # fmt: skip
    assert not list(tmp_path.glob(".*.tmp-*"))  # atomic writes left no temporaries


def test_an_interrupted_export_is_still_replaceable(tmp_path, monkeypatch):
    calls = []

    def failing(scene):
        calls.append(scene)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(scene)

    real = export._sample_members
    monkeypatch.setattr(export, "_sample_members", failing)
    with pytest.raises(KeyboardInterrupt):
        export_world("webdataset", tmp_path, 6, shard_size=2, **SMALL)
    monkeypatch.setattr(export, "_sample_members", real)
    # The manifest was saved before the first write, so the half export counts as polymodal's own.
    export_world("webdataset", tmp_path, 2, shard_size=2, overwrite=True, **SMALL)
    assert _files(tmp_path) == [MANIFEST_FILE, "shard-000000.tar"]


def test_a_symlinked_subfolder_cannot_carry_writes_outside(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "images").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(DestinationExistsError, match=r"images/train-000000\.png leads outside"):
        export_world("llava", out, 2, overwrite=True, **SMALL)
    assert list(elsewhere.iterdir()) == []


def test_folder_export_makes_only_the_class_folders_it_fills(tmp_path):
    root = export_world("folder", tmp_path, 2, **SMALL)
    folders = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert 1 <= len(folders) <= 2 and all(any((tmp_path / f).iterdir()) for f in folders)
    reader = ImageFolderReader(root)
    assert reader.classes == sorted(SHAPES)  # classes.txt keeps every index, folder or not
    assert sorted({r.class_name for r in reader}) == folders


BAD_ARGUMENTS = [
    ({"n": 0}, "--n must be >= 1, got 0"),
    ({"n": -3}, "--n must be >= 1, got -3"),
    ({"n": 2.5}, "--n must be an integer, got 2.5"),
    ({"shard_size": 0}, "--shard-size must be >= 1, got 0"),
    ({"seed": -1}, "--seed must be >= 0, got -1"),
    ({"image_size": 4}, rf"--image-size must be an integer in \[{MIN_IMAGE_SIZE}, 1024\], got 4"),
    ({"image_size": 100_000}, r"--image-size must be an integer in \[16, 1024\], got 100000"),
    ({"split": "validation"}, "--split 'validation' is not one of"),
    ({"format": "parquet"}, "--format 'parquet' is not one of"),
    ({"num_objects": (3, 1)}, "world export: World: num_objects"),
]


@pytest.mark.parametrize("bad,message", BAD_ARGUMENTS, ids=[m[:24] for _, m in BAD_ARGUMENTS])
def test_bad_arguments_are_refused_before_any_work(tmp_path, bad, message):
    out = tmp_path / "out"
    kwargs = {"format": "llava", "out_dir": out, "n": 2, **SMALL, **bad}
    with pytest.raises(UsageError, match=message):
        export_world(**kwargs)
    assert not out.exists()


def test_cli_flags_and_help(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="polymodal")
    add_cli(parser.add_subparsers(dest="command", required=True))
    with pytest.raises(SystemExit):
        parser.parse_args(["world", "export", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "train (the default)" in help_text and all(split in help_text for split in SPLITS)
    assert f"({MIN_IMAGE_SIZE} to 1024)" in help_text and "--overwrite" in help_text
    (tmp_path / "theirs.txt").write_text("x")
    args = parser.parse_args(["world", "export", "--format", "folder", "--out", str(tmp_path), "--n", "2",
                              "--image-size", "16", "--split", "val", "--overwrite"])  # fmt: skip
    args.func(args)
    assert "wrote 2 val scenes as folder" in capsys.readouterr().out
    assert (tmp_path / "theirs.txt").read_text() == "x"
    args = parser.parse_args(["world", "export", "--format", "folder", "--out", str(tmp_path), "--n", "0"])
    with pytest.raises(UsageError, match="--n must be >= 1, got 0"):
        args.func(args)
