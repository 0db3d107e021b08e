"""Recognise an untrusted image package by its content and unpack it safely.

A package is a tar (plain, gzip or bzip2), a zip, or a bare qcow2, VMDK or raw disk.
Archives are unpacked by our own member loop, which makes only regular files (mode 0o644)
and directories (mode 0o755) and rejects with ``ImageUnsafe`` anything that could reach
outside the destination or exhaust the disk or memory: links, devices, absolute or ``..``
names, duplicates, too many members, too many bytes. Sizes are counted as data is written,
so a lying header or a compression bomb is stopped at the limit, in bounded memory.

Everything here is synchronous; the service runs it in a worker thread.
"""

from __future__ import annotations

import bz2
import contextlib
import enum
import itertools
import lzma
import os
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

from goldclone.errors import ImageUnsafe, ImageUnsupported
from goldclone.images.checks import SNIFF_BYTES, sniff_disk

__all__ = ["DEFAULT_LIMITS", "PackageFormat", "UnpackLimits", "detect_format", "unpack"]

_CHUNK = 1 << 20
_INPUT_CHUNK = 256 << 10
# Bytes that tarfile may read between two members: padding, headers, pax and GNU long-name
# records, plus its read-ahead. More than this is not a real archive but a memory bomb.
_MAX_TAR_METADATA = 4 << 20
_ZEROS = bytes(_CHUNK)
_GZIP_MAGIC = b"\x1f\x8b"
_BZIP2_MAGIC = b"BZh"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
_ZIP_ENCRYPTED = 0x01 | 0x40
_ZIP_UNIX = 3
_ZIP_LOCAL_HEADER = 30
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class PackageFormat(enum.Enum):
    """What a downloaded package is, judged by its content."""

    TAR_GZ = "tar.gz"
    TAR_BZ2 = "tar.bz2"
    ZIP = "zip"
    TAR = "tar"
    QCOW2 = "qcow2"
    VMDK = "vmdk"
    RAW = "raw"


_BARE_DISKS = {PackageFormat.QCOW2, PackageFormat.VMDK, PackageFormat.RAW}


@dataclass(frozen=True)
class UnpackLimits:
    """How much a package may unpack to: total bytes of file data, and number of members."""

    max_total_bytes: int = 64 << 30
    max_members: int = 10_000


DEFAULT_LIMITS = UnpackLimits()


def detect_format(path: Path) -> PackageFormat:
    """Return the format of the package at ``path``, judged by its bytes, never its name.

    A gzip or bzip2 stream counts only if it holds a tar archive. A raw disk counts only
    if it has an MBR or GPT signature. Anything else raises ``ImageUnsupported``.
    """
    with path.open("rb") as f:
        head = f.read(SNIFF_BYTES)
    if head.startswith(_GZIP_MAGIC):
        return _compressed_tar(path, PackageFormat.TAR_GZ)
    if head.startswith(_BZIP2_MAGIC):
        return _compressed_tar(path, PackageFormat.TAR_BZ2)
    if head.startswith(_ZIP_MAGICS):
        return PackageFormat.ZIP
    if _is_tar(head):
        return PackageFormat.TAR
    disk = sniff_disk(head)
    if disk is not None:
        return PackageFormat(disk)
    raise ImageUnsupported(
        "the package is not a tar, tar.gz, tar.bz2 or zip archive, nor a qcow2, VMDK or raw "
        "(MBR or GPT) disk image"
    )


def unpack(path: Path, dest: Path, limits: UnpackLimits = DEFAULT_LIMITS) -> PackageFormat:
    """Unpack the package at ``path`` into the existing, empty directory ``dest``.

    An archive is extracted member by member; a bare disk image is copied to
    ``dest/disk.qcow2``, ``dest/disk.vmdk`` or ``dest/disk.raw``. Runs of zeros are
    skipped with a seek, so sparse disks stay sparse. Returns the detected format.

    Raises ``ImageUnsafe`` for a member that could escape ``dest`` or exceed ``limits``,
    and ``ImageUnsupported`` for a format or a damaged archive that we cannot read. On any
    error, whatever was already written stays in ``dest``: the caller removes ``dest``.
    """
    if any(dest.iterdir()):
        raise ValueError(f"{dest} is not empty")
    fmt = detect_format(path)
    writer = _Writer(dest, limits)
    if fmt in _BARE_DISKS:
        with path.open("rb") as f:
            writer.count_member(f"disk.{fmt.value}")
            writer.write_file(f"disk.{fmt.value}", f.read)
    elif fmt is PackageFormat.ZIP:
        _unpack_zip(path, writer)
    else:
        with path.open("rb") as f:
            _unpack_tar(_open_source(f, fmt), writer)
    return fmt


def _is_tar(block: bytes) -> bool:
    return block[257:262] == b"ustar"


def _compressed_tar(path: Path, fmt: PackageFormat) -> PackageFormat:
    with path.open("rb") as f:
        source = _open_source(f, fmt)
        block = b""
        while len(block) < 512 and (data := source.read(512 - len(block))):
            block += data
    if not _is_tar(block):
        kind = "gzip" if fmt is PackageFormat.TAR_GZ else "bzip2"
        raise ImageUnsupported(f"the package is {kind} data, but not a tar archive inside")
    return fmt


def _open_source(f: BinaryIO, fmt: PackageFormat) -> _Source:
    if fmt is PackageFormat.TAR_GZ:
        return _GzipSource(f)
    if fmt is PackageFormat.TAR_BZ2:
        return _Bzip2Source(f)
    return _Source(f)


class _Source:
    """A forward-only stream of tar bytes for ``tarfile``'s stream mode.

    While ``budget`` is set, reading more than that many bytes raises ``ImageUnsafe``: the
    tar loop sets it while tarfile reads headers, which it would otherwise buffer whole.
    """

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._pos = 0
        self.budget: int | None = None
        self.after = ""  # the last member read, for messages

    def read(self, size: int = -1, /) -> bytes:
        if size == 0:
            return b""  # zlib would take a limit of 0 as no limit at all
        data = self._read(_CHUNK if size < 0 else size)
        self._pos += len(data)
        if self.budget is not None:
            self.budget -= len(data)
            if self.budget < 0:
                where = f"after member {self.after!r}" if self.after else "at its start"
                raise ImageUnsafe(f"the tar archive has oversized header data {where}")
        return data

    def _read(self, size: int) -> bytes:
        return self._f.read(size)

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, /) -> int:
        raise OSError("the package is read as a stream")

    def write(self, data: bytes, /) -> int:
        raise OSError("the package is read-only")

    def close(self) -> None:
        pass


class _CompressedSource(_Source):
    """Decompresses one or more concatenated streams, never more than asked at a time."""

    _label = ""
    _magic = b""

    def __init__(self, f: BinaryIO) -> None:
        super().__init__(f)
        self._pending = b""
        self._done = False
        self._start()

    def _read(self, size: int) -> bytes:
        while not self._done:
            if self._at_eof():
                self._next_stream()
                continue
            data, self._pending = self._pending, b""
            if not data and self._wants_input():
                data = self._f.read(_INPUT_CHUNK)
                if not data:
                    raise ImageUnsupported(f"the {self._label} stream is truncated")
            out = self._inflate(data, size)
            if out:
                return out
        return b""

    def _next_stream(self) -> None:
        rest = self._unused()
        if len(rest) < len(self._magic):
            rest += self._f.read(_INPUT_CHUNK)
        if rest.startswith(self._magic):
            self._start()
            self._pending = rest
        else:
            # Like gzip and GNU tar, ignore zero padding or garbage after the last stream.
            self._done = True

    def _start(self) -> None:
        raise NotImplementedError

    def _at_eof(self) -> bool:
        raise NotImplementedError

    def _wants_input(self) -> bool:
        raise NotImplementedError

    def _inflate(self, data: bytes, size: int) -> bytes:
        raise NotImplementedError

    def _unused(self) -> bytes:
        raise NotImplementedError


class _GzipSource(_CompressedSource):
    _label = "gzip"
    _magic = _GZIP_MAGIC

    def _start(self) -> None:
        self._d = zlib.decompressobj(wbits=31)
        self._full = False

    def _at_eof(self) -> bool:
        return self._d.eof

    def _wants_input(self) -> bool:
        # After a call that filled its output, zlib may hold more without new input.
        return not self._full

    def _inflate(self, data: bytes, size: int) -> bytes:
        try:
            out = self._d.decompress(data, size)
        except zlib.error as exc:
            raise ImageUnsupported(f"the gzip data is damaged: {exc}") from None
        self._pending = self._d.unconsumed_tail
        self._full = len(out) == size
        return out

    def _unused(self) -> bytes:
        return self._d.unused_data


class _Bzip2Source(_CompressedSource):
    _label = "bzip2"
    _magic = _BZIP2_MAGIC

    def _start(self) -> None:
        self._d = bz2.BZ2Decompressor()

    def _at_eof(self) -> bool:
        return self._d.eof

    def _wants_input(self) -> bool:
        return self._d.needs_input

    def _inflate(self, data: bytes, size: int) -> bytes:
        try:
            return self._d.decompress(data, size)
        except (OSError, EOFError) as exc:
            raise ImageUnsupported(f"the bzip2 data is damaged: {exc}") from None

    def _unused(self) -> bytes:
        return self._d.unused_data


class _Writer:
    """Creates the members of a package under ``dest``, enforcing names and limits."""

    def __init__(self, dest: Path, limits: UnpackLimits) -> None:
        self._dest = dest
        self.limits = limits
        self._members = 0
        self._bytes = 0
        self._is_dir: dict[tuple[str, ...], bool] = {}  # every path made, explicit or not
        self._explicit: set[tuple[str, ...]] = set()

    def count_member(self, name: str) -> None:
        self._members += 1
        if self._members > self.limits.max_members:
            raise ImageUnsafe(
                f"the package has more than {self.limits.max_members} members (stopped at {name!r})"
            )

    def make_dir(self, name: str) -> None:
        parts = self._claim(name, is_dir=True)
        if parts and not self._is_dir.get(parts):
            os.mkdir(self._dest.joinpath(*parts), 0o755)
            self._is_dir[parts] = True

    def write_file(self, name: str, read: Callable[[int], bytes]) -> None:
        parts = self._claim(name, is_dir=False)
        if not parts:
            raise ImageUnsafe(f"member {name!r} has an empty name")
        self._is_dir[parts] = False
        fd = os.open(self._dest.joinpath(*parts), _FILE_FLAGS, 0o644)
        try:
            self._copy(fd, read, name)
        finally:
            os.close(fd)

    def _claim(self, name: str, *, is_dir: bool) -> tuple[str, ...]:
        parts = _safe_parts(name)
        for depth in range(1, len(parts)):
            parent = parts[:depth]
            parent_is_dir = self._is_dir.get(parent)
            if parent_is_dir is False:
                raise ImageUnsafe(f"member {name!r} lies inside a file of the package")
            if parent_is_dir is None:
                os.mkdir(self._dest.joinpath(*parent), 0o755)
                self._is_dir[parent] = True
        if parts in self._is_dir and self._is_dir[parts] != is_dir:
            raise ImageUnsafe(f"member {name!r} is both a file and a directory")
        if parts in self._explicit:
            raise ImageUnsafe(f"member {name!r} appears more than once in the package")
        if parts:
            self._explicit.add(parts)
        return parts

    def _copy(self, fd: int, read: Callable[[int], bytes], name: str) -> None:
        size = 0
        ends_in_hole = False
        while chunk := read(_CHUNK):
            self._count_bytes(len(chunk), name)
            size += len(chunk)
            ends_in_hole = len(chunk) == _CHUNK and chunk == _ZEROS
            if ends_in_hole:
                os.lseek(fd, _CHUNK, os.SEEK_CUR)
            else:
                _write_all(fd, chunk)
        if ends_in_hole:
            os.ftruncate(fd, size)

    def _count_bytes(self, count: int, name: str) -> None:
        self._bytes += count
        if self._bytes > self.limits.max_total_bytes:
            raise ImageUnsafe(
                f"the package unpacks to more than {self.limits.max_total_bytes} bytes "
                f"(stopped in member {name!r})"
            )


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _safe_parts(name: str) -> tuple[str, ...]:
    """Split a member name into path components, rejecting any that is not plainly relative."""
    if "\x00" in name:
        raise ImageUnsafe(f"member {name!r} has a NUL byte in its name")
    if "\\" in name:
        raise ImageUnsafe(f"member {name!r} has a backslash in its name")
    if any(ord(c) < 0x20 or c == "\x7f" for c in name):
        raise ImageUnsafe(f"member {name!r} has a control character in its name")
    if name.startswith("/"):
        raise ImageUnsafe(f"member {name!r} has an absolute path")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise ImageUnsafe(f"member {name!r} has a '..' component in its path")
    if any(len(os.fsencode(part)) > 255 for part in parts):
        raise ImageUnsupported(f"member {name!r} has a name component over 255 bytes")
    return parts


def _unpack_tar(source: _Source, writer: _Writer) -> None:
    with _open_tar_stream(source) as tar:
        while True:
            with _reading_headers(source):
                member = tar.next()
            if member is None:
                return
            _unpack_tar_member(tar, member, writer)
            source.after = member.name


def _open_tar_stream(source: _Source) -> tarfile.TarFile:
    # Opening a stream already reads the first member's header.
    with _reading_headers(source):
        return tarfile.open(fileobj=source, mode="r|", bufsize=_CHUNK)


def _unpack_tar_member(tar: tarfile.TarFile, member: tarfile.TarInfo, writer: _Writer) -> None:
    writer.count_member(member.name)
    if _tar_member_is_dir(member):
        writer.make_dir(member.name)
        return
    data = tar.extractfile(member)
    assert data is not None  # a regular file always has data
    with data:
        writer.write_file(member.name, _tar_reader(data, member.name))


@contextlib.contextmanager
def _reading_headers(source: _Source) -> Iterator[None]:
    """Bound what tarfile may read for headers, and report a damaged archive plainly."""
    source.budget = _MAX_TAR_METADATA
    try:
        yield
    except (tarfile.TarError, EOFError, IndexError, ValueError) as exc:
        where = f"after member {source.after!r}" if source.after else "at its start"
        raise ImageUnsupported(f"the tar archive is damaged {where}: {exc}") from None
    finally:
        source.budget = None


def _tar_reader(data: IO[bytes], name: str) -> Callable[[int], bytes]:
    def read(size: int) -> bytes:
        try:
            return data.read(size)
        except tarfile.TarError as exc:
            raise ImageUnsupported(
                f"the tar archive is damaged in member {name!r}: {exc}"
            ) from None

    return read


def _tar_member_is_dir(member: tarfile.TarInfo) -> bool:
    name = member.name
    if member.isdir():
        return True
    if member.isreg():
        return False
    if member.issym():
        raise ImageUnsafe(f"member {name!r} is a symbolic link")
    if member.islnk():
        raise ImageUnsafe(f"member {name!r} is a hard link")
    if member.ischr() or member.isblk():
        raise ImageUnsafe(f"member {name!r} is a device")
    if member.isfifo():
        raise ImageUnsafe(f"member {name!r} is a fifo")
    raise ImageUnsupported(f"member {name!r} has the unsupported tar type {member.type!r}")


def _unpack_zip(path: Path, writer: _Writer) -> None:
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
