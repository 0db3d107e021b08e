"""Unpacking a tar stream member by member with ``tarfile``'s stream mode, refusing links,
devices and oversized header data."""

from __future__ import annotations

import contextlib
import tarfile
from collections.abc import Callable, Iterator
from typing import IO

from goldclone.errors import ImageUnsafe, ImageUnsupported
from goldclone.images.unpack.sources import Source
from goldclone.images.unpack.writer import CHUNK, Writer

# Bytes that tarfile may read between two members: padding, headers, pax and GNU long-name
# records, plus its read-ahead. More than this is not a real archive but a memory bomb.
_MAX_TAR_METADATA = 4 << 20


def unpack_tar(source: Source, writer: Writer) -> None:
    with _open_tar_stream(source) as tar:
        while True:
            with _reading_headers(source):
                member = tar.next()
            if member is None:
                return
            _unpack_tar_member(tar, member, writer)
            source.after = member.name


def _open_tar_stream(source: Source) -> tarfile.TarFile:
    # Opening a stream already reads the first member's header.
    with _reading_headers(source):
        return tarfile.open(fileobj=source, mode="r|", bufsize=CHUNK)


def _unpack_tar_member(tar: tarfile.TarFile, member: tarfile.TarInfo, writer: Writer) -> None:
    writer.count_member(member.name)
    if _tar_member_is_dir(member):
        writer.make_dir(member.name)
        return
    data = tar.extractfile(member)
    assert data is not None  # a regular file always has data
    with data:
        writer.write_file(member.name, _tar_reader(data, member.name))


@contextlib.contextmanager
def _reading_headers(source: Source) -> Iterator[None]:
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
