"""WebDataset shards cut or corrupted anywhere: never a silent loss, a counted skip naming the shard
and byte offset (non-strict) or a DataError naming them (strict)."""

import gzip
import io
import re
import tarfile

import pytest

from polymodal.data.export import export_world
from polymodal.data.formats import WebDatasetReader
from polymodal.data.formats.tarstream import split_name
from polymodal.data.loading import DataError

N = 5  # scenes in the exported shard; 3 members each (.png, .txt, .json)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """(bytes of an exported one-shard WebDataset, its members' (name, header offset, data offset, size))."""
    out = tmp_path_factory.mktemp("wds")
    export_world("webdataset", out, N, image_size=16, shard_size=100)
    path = out / "shard-000000.tar"
    with tarfile.open(path) as tar:
        members = [(m.name, m.offset, m.offset_data, m.size) for m in tar.getmembers()]
    return path.read_bytes(), members


def _cuts(members):
    """(label, cut offset, byte offset the report must name, samples that must still be read)."""
    name, header, data, size = members[6]  # the first member of sample 2
    _, _, last_data, last_size = members[-1]
    end = last_data + -(-last_size // 512) * 512  # where the end-of-archive marker starts
    return [
        ("at a member boundary", header, header, 2),
        ("mid-header", header + 100, header, 2),
        ("mid-member", data + size // 2, header, 2),
        ("first header", 300, 0, 0),
        ("first member's data", 600, 0, 0),
        ("before the end marker", end, end, N),
        ("mid end marker", end + 200, end, N),
    ]


@pytest.mark.parametrize("case", range(7), ids=lambda i: ["boundary", "mid-header", "mid-member", "first-header",
                                                           "first-data", "no-marker", "mid-marker"][i])  # fmt: skip
def test_truncated_shard_is_reported_with_offset(tmp_path, shard, case):
    data, members = shard
    label, cut, offset, survivors = _cuts(members)[case]
    path = tmp_path / "cut.tar"
    path.write_bytes(data[:cut])
    reader = WebDatasetReader([str(path)])
    keys = [r.key for r in reader]
    assert keys == [f"train-{i:06d}" for i in range(survivors)], label
    assert reader.skipped.count >= 1
    report = reader.skipped.reasons[0]
    assert report.startswith(f"{path}: tar stream at byte {offset}") and "\n" not in report, report
    with pytest.raises(DataError, match=rf"cut\.tar: tar stream at byte {offset}"):
        list(WebDatasetReader([str(path)], strict=True))


def test_complete_shard_and_one_zero_block_marker_are_clean(tmp_path, shard):
    data, members = shard
    _, _, last_data, last_size = members[-1]
    end = last_data + -(-last_size // 512) * 512
    for cut in (len(data), end + 512):  # the whole file; only the first zero block of the marker
        path = tmp_path / "whole.tar"
        path.write_bytes(data[:cut])
        reader = WebDatasetReader([str(path)], strict=True)
        assert len(list(reader)) == N and reader.skipped.count == 0


def test_corrupt_header_mid_archive(tmp_path, shard):
    data, members = shard
    header = members[6][1]
    broken = bytearray(data)
    broken[header : header + 100] = b"\x07" * 100
    path = tmp_path / "corrupt.tar"
    path.write_bytes(bytes(broken))
    reader = WebDatasetReader([str(path)])
    assert len(list(reader)) == 2
    assert reader.skipped.reasons == [f"{path}: tar stream at byte {header}: corrupt member header (bad checksum); "
                                      "the rest of the shard is unreadable"]  # fmt: skip


def test_compressed_shard_and_truncated_compression(tmp_path, shard):
    data, _ = shard
    path = tmp_path / "s.tar.gz"
    path.write_bytes(gzip.compress(data))
    assert len(list(WebDatasetReader([str(path)], strict=True))) == N
    path.write_bytes(gzip.compress(data)[: len(gzip.compress(data)) // 2])
    reader = WebDatasetReader([str(path)])
    assert len(list(reader)) < N and reader.skipped.count >= 1
    report = reader.skipped.reasons[0]
    assert re.match(rf"{re.escape(str(path))}: tar stream at byte \d+ \(member '[^']+'\): archive truncated", report)


def test_unreadable_shards_are_counted_and_the_others_read(tmp_path, shard):
    data, _ = shard
    (tmp_path / "good.tar").write_bytes(data)
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "text.tar").write_bytes(b"this is not a tar file at all" * 40)
    (tmp_path / "folder.tar").mkdir()
    names = ["empty.tar", "missing.tar", "text.tar", "folder.tar", "good.tar"]
    reader = WebDatasetReader([str(tmp_path / n) for n in names])
    assert len(list(reader)) == N
    assert reader.skipped.count == 4
    for name, reason in zip(names, reader.skipped.reasons):
        assert f"{tmp_path / name}: tar stream at byte 0: " in reason and "\n" not in reason
    with pytest.raises(DataError, match=r"missing\.tar: tar stream at byte 0: cannot open shard"):
        list(WebDatasetReader([str(tmp_path / "missing.tar")], strict=True))


def _tar(path, members):
    """Write `members`: (name, bytes) for files, or (name, TarInfo type, link target) for others."""
    with tarfile.open(path, "w") as tar:
        for name, *rest in members:
            info = tarfile.TarInfo(name)
            if len(rest) == 1:
                info.size = len(rest[0])
                tar.addfile(info, io.BytesIO(rest[0]))
            else:
                info.type, info.linkname = rest
                tar.addfile(info)


def test_odd_members_are_counted_skips_naming_the_member(tmp_path, shard):
    data, _ = shard
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        png = tar.extractfile("train-000000.png").read()
    path = tmp_path / "odd.tar"
    _tar(path, [
        ("a.png", png), ("a.txt", b"good"),
        ("noext", b"x"), (".hidden.png", png), ("dot.", b"x"),  # names without a key
        ("folder", tarfile.DIRTYPE, ""), ("__index__", b"webdataset metadata"),  # ignored, as WebDataset does
        ("b.png", tarfile.SYMTYPE, "../../etc/passwd"), ("b.txt", b"link"),
        ("c.png", tarfile.LNKTYPE, "a.png"), ("c.txt", b"hard link"),
        ("d.png", png), ("d.txt", b"one"), ("d.txt", b"two"),  # a duplicated member
        ("e.png", png), ("e.json", b"[" * 100_000 + b"]" * 100_000),  # JSON nested too deeply
        ("f.png", png), ("f.json", b"[1]"), ("g.png", png), ("g.txt", b"\xff\xfe"),
        ("sub/h.PNG", png), ("sub/h.TXT", b"upper case, in a folder"),
    ])  # fmt: skip
    reader = WebDatasetReader([str(path)])
    assert [(r.key, r.text) for r in reader] == [("a", "good"), ("sub/h", "upper case, in a folder")]
    expected = [
        "member 'noext': name has no key", "member '.hidden.png': name has no key", "member 'dot.': name has no key",
        "key b: member 'b.png' is a symlink", "key c: member 'c.png' is a hard link", "key d: member 'd.txt' appears",
        "key e: .json member: JSON nested too deeply", "key f: .json member is a list",
        "key g: .txt member is not UTF-8",
    ]  # fmt: skip
    assert reader.skipped.count == len(expected)
    for reason, culprit in zip(reader.skipped.reasons, expected):
        assert reason.startswith(f"{path}: {culprit}"), reason
    with pytest.raises(DataError, match=r"odd\.tar: member 'noext': name has no key"):
        list(WebDatasetReader([str(path)], strict=True))


def test_oversized_member_is_not_read(tmp_path, shard):
    data, _ = shard
    path = tmp_path / "s.tar"
    path.write_bytes(data)
    reader = WebDatasetReader([str(path)], max_member_bytes=1000)  # every .json member is larger
    assert list(reader) == []
    assert reader.skipped.count == N
    assert "member 'train-000000.json' is " in reader.skipped.reasons[0]
    assert "over max_member_bytes=1000" in reader.skipped.reasons[0]


@pytest.mark.parametrize(
    "name,expected",
    [("000042.jpg", ("000042", "jpg")), ("a/b/c.seg.PNG", ("a/b/c", "seg.png")), ("noext", None),
     (".png", None), ("a.", None), ("dir/", None)],
)  # fmt: skip
def test_split_name_follows_webdataset(name, expected):
    assert split_name(name) == expected
