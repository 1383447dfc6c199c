"""Read a WebDataset tar shard as samples, and notice every way the shard can be cut or broken.

Python's `tarfile` stops iterating quietly when an archive ends early: a shard cut at a member
boundary, or inside a member's header, or holding a corrupt header, simply looks shorter, and
the samples after the cut vanish without a word. `iter_shard` tells these apart from a real end
(a zero block, the end-of-archive marker) and reports them, naming the shard and byte offset,
to the reader's `SkipCounter`: a counted skip, or a `DataError` in strict mode. Member-level
problems (a name with no key, a link, a member too large to hold, a duplicated member) cost only
their sample.

Samples group consecutive members sharing a key, WebDataset's rule: the key of
`dir/000042.seg.png` is `dir/000042` and its extension `seg.png` (lowercased). Plain and
compressed (gzip, bz2, xz) tars are read; offsets count bytes of the uncompressed tar.
"""

from __future__ import annotations

import lzma
import os
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from polymodal.data.loading import SkipCounter, short_repr

# A single image or caption: 512 MiB is far beyond any real one, and reading a member means
# holding it in memory, so a header declaring more is refused rather than trusted.
DEFAULT_MAX_MEMBER_BYTES = 512 * 1024 * 1024

# Errors a damaged archive or compressed stream raises while being read.
READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError)


@dataclass
class TarSample:
    """The members of one sample: `members[ext] = bytes` (or, read without data, `spans[ext] =
    (byte offset, size)` of each member's data in the tar); `problem` says why it is unusable, if so."""

    key: str
    shard: str
    members: dict[str, bytes] = field(default_factory=dict)
    problem: str | None = None
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)


class _Header(tarfile.TarInfo):
    """A TarInfo that records on its TarFile why the last header read failed.

    `TarFile.next()` swallows the header errors after the first member and just returns None, so
    without this a truncated or corrupt shard is indistinguishable from a complete one.
    """

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as err:
            tar.last_header_error = err
            raise


def split_name(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name by WebDataset's rule, or None if it has no key."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot or not ext:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_shard(
    shard: str, counter: SkipCounter, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES, read_data: bool = True
) -> Iterator[TarSample]:
    """Yield the samples of one tar shard in order; report archive and member problems to `counter`.

    A sample is yielded even when it has a `problem` (the caller skips it, counted, naming its
    key). When the archive breaks, the sample being gathered is yielded after the break is
    reported; nothing after the break can be read. read_data=False (an index for random access,
    plain tars only) records each member's `spans` instead of reading it; a member whose data
    runs past the end of the file is the archive breaking there.
    """
    try:
        handle = open(shard, "rb")
    except OSError as err:
        counter.skip(f"{shard}: tar stream at byte 0", f"cannot open shard: {err.strerror or err}")
        return
    with handle:
        try:
            tar = tarfile.open(fileobj=handle, mode="r:*", tarinfo=_Header)
        except READ_ERRORS as err:
            # tarfile lists one failure per compression it tried; the last one is the plain tar's.
            reason = str(err).splitlines()[-1].lstrip("- ") if str(err) else type(err).__name__
            counter.skip(f"{shard}: tar stream at byte 0", f"not a readable tar archive ({reason}); the shard is lost")
            return
        if not read_data and tar.fileobj is not handle:
            counter.skip(f"{shard}: tar stream at byte 0", "a compressed shard cannot be indexed for random access; "
                         "give plain .tar shards")
            return
        size = os.fstat(handle.fileno()).st_size if not read_data else None
        with tar:
            yield from _samples(tar, shard, counter, max_member_bytes, size)


def _samples(tar: tarfile.TarFile, shard: str, counter: SkipCounter, max_member_bytes: int,
             file_size: int | None) -> Iterator[TarSample]:
    """Group the members of an open shard into samples (see `iter_shard`); with `file_size`, record
    member spans instead of reading the data."""
    sample: TarSample | None = None
    while True:
        info = None
        try:
            info = tar.next()
            # TarFile keeps every header it reads; a shard holds millions, so forget them.
            tar.members = []
            if info is None:
                problem = _end_problem(tar)
                if problem is not None:
                    counter.skip(f"{shard}: tar stream at byte {tar.offset}", problem)
                break
            named = _member(tar, info, shard, counter, max_member_bytes, file_size)
        except READ_ERRORS as err:
            # tar.offset is where the header that failed starts; a member's data failing to read
            # is reported at that member's header.
            where = f"byte {tar.offset}" if info is None else f"byte {info.offset} (member {short_repr(info.name)})"
            counter.skip(f"{shard}: tar stream at {where}", f"archive truncated or corrupt ({err}); the rest is lost")
            break
        if named is None:
            continue
        key, ext, data, problem = named
        if sample is None or key != sample.key:
            if sample is not None:
                yield sample
            sample = TarSample(key, shard)
        if problem is None and ext in sample.members:
            problem = f"member {short_repr(info.name)} appears twice"
        sample.problem = sample.problem or problem
        if file_size is None:
            sample.members[ext] = data
        else:
            sample.spans[ext] = (info.offset_data, info.size)
    if sample is not None:
        yield sample


def _member(
    tar: tarfile.TarFile, info: tarfile.TarInfo, shard: str, counter: SkipCounter, max_member_bytes: int,
    file_size: int | None = None,
) -> tuple[str, str, bytes, str | None] | None:
    """(key, extension, data, problem) of one member, or None for a member that joins no sample.

    Folders and WebDataset's reserved `__name__` metadata members are ignored, as WebDataset
    does; a name without a key is a counted skip of its own; links, devices and oversized
    members make their sample unusable (`problem`) without being read.
    """
    base = info.name.rpartition("/")[2]
    if info.isdir() or (base.startswith("__") and base.endswith("__")):
        return None
    named = split_name(info.name)
    if named is None:
        counter.skip(f"{shard}: member {short_repr(info.name)}", "name has no key (expected <key>.<extension>)")
        return None
    key, ext = named
    if not info.isreg():
        kind = "symlink" if info.issym() else "hard link" if info.islnk() else "device or fifo"
        return key, ext, b"", f"member {short_repr(info.name)} is a {kind}, not a regular file"
    if info.size > max_member_bytes:
        size = f"{info.size} bytes, over max_member_bytes={max_member_bytes}"
        return key, ext, b"", f"member {short_repr(info.name)} is {size}"
    if file_size is not None:  # indexing: the data stays on disk, but it must all be there
        if info.offset_data + info.size > file_size:
            raise tarfile.ReadError(f"member {short_repr(info.name)} runs past the end of the file")
        return key, ext, b"", None
    return key, ext, tar.extractfile(info).read(), None


def _end_problem(tar: tarfile.TarFile) -> str | None:
    """Why iteration of `tar` stopped, if not at its end-of-archive marker (None: a clean end)."""
    err = getattr(tar, "last_header_error", None)
    if err is None or isinstance(err, tarfile.EOFHeaderError):
        return None
    if isinstance(err, tarfile.EmptyHeaderError):
        return "archive ends without its end-of-archive marker (truncated at a member boundary); later samples are lost"
    if isinstance(err, tarfile.TruncatedHeaderError):
        return "archive ends inside a member header (truncated); the rest of the shard is lost"
    return f"corrupt member header ({err}); the rest of the shard is unreadable"
