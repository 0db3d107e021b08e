"""Unpacking a zip archive, after checking its central directory: member count, declared
size, types, encryption, compression methods and overlapping members (zip bombs)."""

from __future__ import annotations

import contextlib
import itertools
import lzma
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from goldclone.errors import ImageUnsafe, ImageUnsupported
from goldclone.images.unpack.writer import UnpackLimits, Writer

_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
_ZIP_ENCRYPTED = 0x01 | 0x40
_ZIP_UNIX = 3
_ZIP_LOCAL_HEADER = 30


def unpack_zip(path: Path, writer: Writer) -> None:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ImageUnsupported(f"the zip archive is damaged: {exc}") from None
    with archive:
        members = archive.infolist()
        _check_zip_members(path, members, writer.limits)
        for info in members:
            name = info.orig_filename
            writer.count_member(name)
            if _zip_member_is_dir(info):
                writer.make_dir(name)
                continue
            with _zip_errors(name):
                data = archive.open(info)
            with data:
                writer.write_file(name, _zip_reader(data, name))


def _check_zip_members(path: Path, members: list[zipfile.ZipInfo], limits: UnpackLimits) -> None:
    """Reject what the central directory alone shows is bad, before anything is written."""
    if len(members) > limits.max_members:
        raise ImageUnsafe(f"the package has {len(members)} members, more than {limits.max_members}")
    declared = sum(info.file_size for info in members)
    if declared > limits.max_total_bytes:
        raise ImageUnsafe(
            f"the package declares {declared} bytes, more than {limits.max_total_bytes}"
        )
    for info in members:
        _zip_member_is_dir(info)
    _check_zip_overlaps(path, members)


def _zip_member_is_dir(info: zipfile.ZipInfo) -> bool:
    name = info.orig_filename
    if info.flag_bits & _ZIP_ENCRYPTED:
        raise ImageUnsupported(f"member {name!r} is encrypted")
    if info.compress_type not in _ZIP_METHODS:
        raise ImageUnsupported(
            f"member {name!r} uses the unsupported compression method {info.compress_type}"
        )
    is_dir = name.endswith("/")
    mode = info.external_attr >> 16 if info.create_system == _ZIP_UNIX else 0
    kind = stat.S_IFMT(mode)
    if stat.S_ISLNK(mode):
        raise ImageUnsafe(f"member {name!r} is a symbolic link")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise ImageUnsafe(f"member {name!r} is a device, fifo or socket")
    if (kind == stat.S_IFDIR) != is_dir and kind != 0:
        raise ImageUnsafe(f"member {name!r} has a file type that contradicts its name")
    if is_dir and info.file_size:
        raise ImageUnsafe(f"directory member {name!r} has data")
    return is_dir


def _check_zip_overlaps(path: Path, members: list[zipfile.ZipInfo]) -> None:
    """Reject members whose local header and data overlap another's, as zip bombs do."""
    size = path.stat().st_size
    spans: list[tuple[int, int, str]] = []
    with path.open("rb") as f:
        for info in members:
            if not 0 <= info.header_offset < size:
                raise ImageUnsupported(
                    f"member {info.orig_filename!r} starts outside the zip archive "
                    "(its central directory is damaged)"
                )
            f.seek(info.header_offset)
            header = f.read(_ZIP_LOCAL_HEADER)
            if len(header) < _ZIP_LOCAL_HEADER or not header.startswith(b"PK\x03\x04"):
                raise ImageUnsupported(f"member {info.orig_filename!r} has no local zip header")
            name_len, extra_len = struct.unpack_from("<HH", header, 26)
            end = info.header_offset + _ZIP_LOCAL_HEADER + name_len + extra_len
            end += info.compress_size
            if end > size:
                raise ImageUnsupported(f"member {info.orig_filename!r} runs past the zip's end")
            spans.append((info.header_offset, end, info.orig_filename))
    spans.sort()
    for (_, end, first), (start, _, second) in itertools.pairwise(spans):
        if start < end:
            raise ImageUnsafe(f"members {first!r} and {second!r} overlap in the zip archive")


@contextlib.contextmanager
def _zip_errors(name: str) -> Iterator[None]:
    """Turn the errors of a damaged zip member into ``ImageUnsupported``."""
    try:
        yield
    except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError) as exc:
        raise ImageUnsupported(f"member {name!r} of the zip archive is damaged: {exc}") from None


def _zip_reader(data: IO[bytes], name: str) -> Callable[[int], bytes]:
    def read(size: int) -> bytes:
        with _zip_errors(name):
            return data.read(size)

    return read
