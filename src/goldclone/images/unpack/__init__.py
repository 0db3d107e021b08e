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

import enum
from pathlib import Path

from goldclone.errors import ImageUnsupported
from goldclone.images.checks import SNIFF_BYTES, sniff_disk
from goldclone.images.damage import read_as_package
from goldclone.images.unpack.sources import BZIP2_MAGIC, GZIP_MAGIC, Compression, open_source
from goldclone.images.unpack.tar_archive import unpack_tar
from goldclone.images.unpack.writer import UnpackLimits, Writer
from goldclone.images.unpack.zip_archive import unpack_zip

__all__ = ["DEFAULT_LIMITS", "PackageFormat", "UnpackLimits", "detect_format", "unpack"]

_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")


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


DEFAULT_LIMITS = UnpackLimits()


def detect_format(path: Path) -> PackageFormat:
    """Return the format of the package at ``path``, judged by its bytes, never its name.

    A gzip or bzip2 stream counts only if it holds a tar archive. A raw disk counts only
    if it has an MBR or GPT signature. Anything else raises ``ImageUnsupported``.
    """
    with path.open("rb") as f:
        head = f.read(SNIFF_BYTES)
    if head.startswith(GZIP_MAGIC):
        return _compressed_tar(path, PackageFormat.TAR_GZ)
    if head.startswith(BZIP2_MAGIC):
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
    with read_as_package("the package"):
        return _unpack(path, dest, limits)


def _unpack(path: Path, dest: Path, limits: UnpackLimits) -> PackageFormat:
    fmt = detect_format(path)
    writer = Writer(dest, limits)
    if fmt in _BARE_DISKS:
        with path.open("rb") as f:
            writer.count_member(f"disk.{fmt.value}")
            writer.write_file(f"disk.{fmt.value}", f.read)
    elif fmt is PackageFormat.ZIP:
        unpack_zip(path, writer)
    else:
        with path.open("rb") as f:
            unpack_tar(open_source(f, _compression(fmt)), writer)
    return fmt


def _is_tar(block: bytes) -> bool:
    return block[257:262] == b"ustar"


def _compressed_tar(path: Path, fmt: PackageFormat) -> PackageFormat:
    with path.open("rb") as f:
        source = open_source(f, _compression(fmt))
        block = b""
        while len(block) < 512 and (data := source.read(512 - len(block))):
            block += data
    if not _is_tar(block):
        raise ImageUnsupported(
            f"the package is {_compression(fmt)} data, but not a tar archive inside"
        )
    return fmt


def _compression(fmt: PackageFormat) -> Compression | None:
    if fmt is PackageFormat.TAR_GZ:
        return "gzip"
    return "bzip2" if fmt is PackageFormat.TAR_BZ2 else None
