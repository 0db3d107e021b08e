"""Checking a disk image's headers before QEMU sees it.

``qemu-img`` follows references stored inside an image: a qcow2 backing file or external
data file, VMDK extents and parent disks. An untrusted image can point those at any host
file (OpenStack CVE-2022-47951, CVE-2024-32498). So this module reads the headers itself,
and only a disk that refers to nothing outside its own package, and no parent at all,
passes. It never runs ``qemu-img``.
"""

from __future__ import annotations

import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from goldclone.errors import ImageUnsafe, ImageUnsupported

DiskFormat = Literal["qcow2", "raw", "vmdk"]

SNIFF_BYTES = 1024
_QCOW2_MAGIC = b"QFI\xfb"
_VMDK4_MAGIC = b"KDMV"
_VMDK3_MAGIC = b"COWD"
_DESCRIPTOR_MAGIC = b"# Disk DescriptorFile"
_IMAGE_MAGICS = (_QCOW2_MAGIC, _VMDK4_MAGIC, _VMDK3_MAGIC, _DESCRIPTOR_MAGIC)

_QCOW2_MAX_CLUSTER = 2 << 20
_QCOW2_DIRTY, _QCOW2_CORRUPT, _QCOW2_DATA_FILE = 1, 2, 4
_QCOW2_KNOWN_INCOMPATIBLE = 0b11111
_QCOW2_EXT_DATA_FILE = 0x44415441

_SECTOR = 512
_MAX_DESCRIPTOR = 64 << 10
# QEMU looks for a parent in the 20 sectors after the first, whatever the header says.
_QEMU_PARENT_WINDOW = 20 * _SECTOR
_VMDK_GD_AT_END = 0xFFFFFFFFFFFFFFFF
_VMDK_FOOTER_MARKER = 3
_SPARSE_CREATE_TYPES = {"monolithicSparse", "streamOptimized"}
# The descriptor-file types that QEMU opens (block/vmdk.c, vmdk_open_desc_file).
_DESCRIPTOR_CREATE_TYPES = {
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "vmfs",
    "vmfsSparse",
}
_EXTENT_ACCESS = {b"RW", b"RDONLY", b"NOACCESS"}
_FLAT_EXTENTS = {"FLAT", "VMFS"}
_SPARSE_EXTENTS = {"SPARSE", "VMFSSPARSE"}
_EXTENT_LINE = re.compile(
    rb"(?P<access>[A-Z]+)\s+(?P<sectors>\d+)\s+(?P<kind>[A-Z]+)"
    rb'(?:\s+"(?P<file>[^"\r\n]*)"(?:\s+(?P<offset>\d+))?)?'
)


@dataclass(frozen=True)
class DiskImage:
    """A checked disk image: where it is and how QEMU must open it."""

    path: Path
    format: DiskFormat


def sniff_disk(head: bytes) -> DiskFormat | None:
    """Return the disk format that a file's first ``SNIFF_BYTES`` bytes show, if any.

    A raw disk is recognised only by an MBR or GPT signature.
    """
    if head.startswith(_QCOW2_MAGIC):
        return "qcow2"
    if head.startswith((_VMDK4_MAGIC, _DESCRIPTOR_MAGIC)):
        return "vmdk"
    if head[510:512] == b"\x55\xaa" or head[512:520] == b"EFI PART":
        return "raw"
    return None


def check_disk(path: Path, root: Path) -> DiskImage:
    """Check that the disk image at ``path`` is safe to give to QEMU, and return it.

    The format comes from the header, never the name. The file, and every file it refers
    to, must lie inside ``root``. A qcow2 must have no backing file, no external data file
    and no encryption; a VMDK no parent and only extents that are plain files beside it; a
    raw disk an MBR or GPT. The returned path is ``path``'s place under ``root``, with
    symbolic links resolved. Raises ``ImageUnsafe`` or ``ImageUnsupported``.
    """
    name = rel_name(path, root)
    real = _inside(path, root, name)
    with real.open("rb") as f:
        head = f.read(SNIFF_BYTES)
        fmt = sniff_disk(head)
        if fmt == "qcow2":
            f.seek(0)
            check_qcow2_header(f.read(_QCOW2_MAX_CLUSTER), name)
        elif fmt == "vmdk" and head.startswith(_VMDK4_MAGIC):
            _check_sparse_vmdk(f, name, primary=True)
        elif fmt == "vmdk":
            _check_descriptor_file(f, real, root, name)
    if fmt is None:
        raise ImageUnsupported(f"{name} is not a qcow2, VMDK or raw (MBR or GPT) disk image")
    return DiskImage(root / real.relative_to(root.resolve()), fmt)


def virtual_size(disk: DiskImage) -> int:
    """The bytes of the disk that a guest of checked image ``disk`` sees, from its headers.
    Blocking."""
    name = disk.path.name
    with disk.path.open("rb") as f:
        head = f.read(SNIFF_BYTES)
        if disk.format == "qcow2":
            return int.from_bytes(head[24:32], "big")
        if disk.format == "raw":
            return os.fstat(f.fileno()).st_size
        if head.startswith(_VMDK4_MAGIC):
            return _sparse_header(head, name).capacity * _SECTOR
        extents = _parse_descriptor(_read_text(f, 0, name), name).extents
        return sum(extent.sectors for extent in extents) * _SECTOR


def check_qcow2_header(data: bytes, name: str = "the qcow2 image") -> None:
    """Check the start of a qcow2 file: its first cluster, or all of it if shorter.

    Raises ``ImageUnsafe`` for a backing file or an external data file, and
    ``ImageUnsupported`` for encryption, unknown incompatible features, an image marked
    corrupt, or a damaged header. Returns if the header is fine.
    """
    if len(data) < 72 or not data.startswith(_QCOW2_MAGIC):
        raise ImageUnsupported(f"{name} has a truncated qcow2 header")
    version, backing_offset, backing_size, cluster_bits, _, crypt = struct.unpack_from(
        ">IQIIQI", data, 4
    )
    if version not in (2, 3):
        raise ImageUnsupported(f"{name} is qcow2 version {version}; only 2 and 3 are supported")
    if backing_offset or backing_size:
        raise ImageUnsafe(f"{name} has a backing file")
    header_length = 72
    if version == 3:
        header_length = _check_qcow2_v3_fields(data, name)
    if crypt:
        raise ImageUnsupported(f"{name} is encrypted")
    if not 9 <= cluster_bits <= 21:
        raise ImageUnsupported(f"{name} has an invalid cluster size (2^{cluster_bits})")
    _check_qcow2_extensions(data, header_length, 1 << cluster_bits, name)


def _check_qcow2_v3_fields(data: bytes, name: str) -> int:
    if len(data) < 104:
        raise ImageUnsupported(f"{name} has a truncated qcow2 header")
    incompatible, _, _, _, header_length = struct.unpack_from(">QQQII", data, 72)
    if incompatible & _QCOW2_DATA_FILE:
        raise ImageUnsafe(f"{name} has an external data file")
    unknown = incompatible & ~_QCOW2_KNOWN_INCOMPATIBLE
    if unknown:
        raise ImageUnsupported(f"{name} has unknown incompatible qcow2 features ({unknown:#x})")
    if incompatible & _QCOW2_CORRUPT:
        raise ImageUnsupported(f"{name} is marked corrupt")
    if header_length < 104 or header_length % 8:
        raise ImageUnsupported(f"{name} has an invalid qcow2 header length ({header_length})")
    return int(header_length)


def _check_qcow2_extensions(data: bytes, offset: int, cluster_size: int, name: str) -> None:
    """Walk the header extensions, which QEMU reads up to the end of the first cluster."""
    while offset < cluster_size:
        if offset + 8 > len(data):
            raise ImageUnsupported(f"{name} has truncated qcow2 header extensions")
        kind, length = struct.unpack_from(">II", data, offset)
        if kind == 0:
            return
        if kind == _QCOW2_EXT_DATA_FILE:
            raise ImageUnsafe(f"{name} names an external data file")
        offset += 8 + (length + 7) // 8 * 8


@dataclass(frozen=True)
class _Extent:
    access: str
    kind: str
    file: str | None
    sectors: int = 0


@dataclass(frozen=True)
class _Descriptor:
    create_type: str | None
    parent_cid: str | None
    names_parent: bool
    extents: list[_Extent]


@dataclass(frozen=True)
class _SparseHeader:
    version: int
    capacity: int
    descriptor_offset: int
    gd_offset: int


def _check_descriptor_file(f: BinaryIO, real: Path, root: Path, name: str) -> None:
    descriptor = _parse_descriptor(_read_text(f, 0, name), name)
    _check_no_parent(descriptor, name)
    if descriptor.create_type not in _DESCRIPTOR_CREATE_TYPES:
        raise ImageUnsupported(
            f"{name} has the unsupported VMDK type {descriptor.create_type or '(none)'}"
        )
    if not descriptor.extents:
        raise ImageUnsupported(f"{name} is a VMDK descriptor without extents")
    for extent in descriptor.extents:
        _check_extent(extent, real.parent, root, name)


def _check_extent(extent: _Extent, folder: Path, root: Path, name: str) -> None:
    if extent.kind == "ZERO":
        return
    if extent.kind not in _FLAT_EXTENTS | _SPARSE_EXTENTS:
        raise ImageUnsupported(f"{name} has an unsupported {extent.kind} extent")
    if extent.file is None:
        raise ImageUnsupported(f"{name} has a {extent.kind} extent without a file")
    _check_extent_name(extent.file, name)
    extent_name = f"{name} extent {extent.file!r}"
    real = _inside(folder / extent.file, root, extent_name)
    with real.open("rb") as f:
        head = f.read(SNIFF_BYTES)
        if extent.kind in _FLAT_EXTENTS and head.startswith(_IMAGE_MAGICS):
            raise ImageUnsafe(f"{extent_name} is flat, but holds an image header")
        if extent.kind in _SPARSE_EXTENTS and head.startswith(_VMDK4_MAGIC):
            _check_sparse_vmdk(f, extent_name, primary=False, own_name=real.name)
        elif extent.kind in _SPARSE_EXTENTS and not head.startswith(_VMDK3_MAGIC):
            raise ImageUnsupported(f"{extent_name} is not a sparse VMDK extent")


def _check_extent_name(file: str, name: str) -> None:
    if not file or "/" in file or "\\" in file or file in (".", ".."):
        raise ImageUnsafe(f"{name} has an extent outside its folder: {file!r}")


def _check_sparse_vmdk(f: BinaryIO, name: str, *, primary: bool, own_name: str = "") -> None:
    """Check a ``KDMV`` sparse file: its header, any footer, and its embedded descriptor."""
    size = os.fstat(f.fileno()).st_size
    header = _sparse_header(_read_at(f, 0, _SECTOR), name)
    headers = [header]
    if header.gd_offset == _VMDK_GD_AT_END:
        headers.append(_sparse_footer(f, size, name))
    for h in headers:
        if h.version > 3:
            raise ImageUnsupported(f"{name} is VMDK version {h.version}")
        if h.capacity == 0 and h.descriptor_offset:
            raise ImageUnsafe(f"{name} redirects to the extents of its embedded descriptor")
    window = _read_at(f, _SECTOR, _QEMU_PARENT_WINDOW).split(b"\0", 1)[0]
    if b"parentfilenamehint" in window.lower():
        raise ImageUnsafe(f"{name} is a delta disk: it names a parent file")
    if not header.descriptor_offset:
        return
    descriptor = _parse_descriptor(_read_text(f, header.descriptor_offset * _SECTOR, name), name)
    _check_no_parent(descriptor, name)
    allowed = _SPARSE_CREATE_TYPES | _DESCRIPTOR_CREATE_TYPES
    if descriptor.create_type is not None and descriptor.create_type not in allowed:
        raise ImageUnsupported(f"{name} has the unsupported VMDK type {descriptor.create_type}")
    for extent in descriptor.extents:
        if extent.file is not None:
            _check_extent_name(extent.file, name)
        if not primary and extent.file not in (None, own_name):
            raise ImageUnsafe(f"{name} has a descriptor that points to {extent.file!r}")


def _sparse_header(sector: bytes, name: str) -> _SparseHeader:
    if len(sector) < 80 or not sector.startswith(_VMDK4_MAGIC):
        raise ImageUnsupported(f"{name} has a truncated VMDK header")
    version, _, capacity, _, descriptor_offset, _, _, _, gd_offset = struct.unpack_from(
        "<IIQQQQIQQ", sector, 4
    )
    return _SparseHeader(version, capacity, descriptor_offset, gd_offset)


def _sparse_footer(f: BinaryIO, size: int, name: str) -> _SparseHeader:
    """Read the footer of a stream-optimized VMDK, whose header QEMU then uses instead."""
    if size < 4 * _SECTOR:
        raise ImageUnsupported(f"{name} has no VMDK footer")
    marker = _read_at(f, size - 3 * _SECTOR, 16)
    _, marker_size, marker_type = struct.unpack("<QII", marker)
    if marker_size != 0 or marker_type != _VMDK_FOOTER_MARKER:
        raise ImageUnsupported(f"{name} has an invalid VMDK footer")
    return _sparse_header(_read_at(f, size - 2 * _SECTOR, _SECTOR), name)


def _check_no_parent(descriptor: _Descriptor, name: str) -> None:
    if descriptor.names_parent:
        raise ImageUnsafe(f"{name} is a delta disk: it names a parent file")
    if descriptor.parent_cid is not None and descriptor.parent_cid.lower() != "ffffffff":
        raise ImageUnsafe(f"{name} is a delta disk (parentCID {descriptor.parent_cid})")


def _parse_descriptor(text: bytes, name: str) -> _Descriptor:
    """Parse a VMDK descriptor as QEMU reads it: up to its first NUL, line by line.

    Any line that starts with an access word is an extent to QEMU, so such a line that
    does not parse strictly is rejected rather than skipped.
    """
    create_type = parent_cid = None
    extents: list[_Extent] = []
    for raw in text.split(b"\n"):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        if line.split(None, 1)[0] in _EXTENT_ACCESS:
            extents.append(_parse_extent(line, name))
            continue
        key, equals, value = line.partition(b"=")
        if not equals:
            continue
        key = key.strip().lower()
        text_value = value.strip().strip(b'"').decode("latin-1")
        if key == b"createtype":
            create_type = text_value
        elif key == b"parentcid":
            parent_cid = text_value
    return _Descriptor(create_type, parent_cid, b"parentfilenamehint" in text.lower(), extents)


def _parse_extent(line: bytes, name: str) -> _Extent:
    match = _EXTENT_LINE.fullmatch(line)
    if match is None or match["access"] not in _EXTENT_ACCESS:
        shown = line.decode("latin-1")
        raise ImageUnsupported(f"{name} has an extent line that does not parse: {shown!r}")
    file = match["file"]
    return _Extent(
        access=match["access"].decode(),
        kind=match["kind"].decode(),
        file=None if file is None else os.fsdecode(file),
        sectors=int(match["sectors"]),
    )


def _read_text(f: BinaryIO, offset: int, name: str) -> bytes:
    """Read a descriptor at ``offset``: text up to the first NUL, at most 64 KiB."""
    data = _read_at(f, offset, _MAX_DESCRIPTOR + 1)
    text = data.split(b"\0", 1)[0]
    if len(text) > _MAX_DESCRIPTOR:
        raise ImageUnsupported(f"{name} has a VMDK descriptor over 64 KiB")
    return text


def _read_at(f: BinaryIO, offset: int, size: int) -> bytes:
    if offset >= os.fstat(f.fileno()).st_size:
        return b""
    f.seek(offset)
    return f.read(size)


def _inside(path: Path, root: Path, name: str) -> Path:
    """Resolve ``path`` and require a regular file inside ``root``.

    Containment is checked on the path as written before the filesystem is asked anything,
    so that whether a host file exists never changes the answer; then again on the resolved
    path, for links.
    """
    if not Path(os.path.abspath(path)).is_relative_to(os.path.abspath(root)):
        raise ImageUnsafe(f"{name} lies outside the package")
    try:
        real = path.resolve(strict=True)
        mode = real.stat().st_mode
    except (OSError, RuntimeError):
        raise ImageUnsupported(f"{name} is missing") from None
    if not real.is_relative_to(root.resolve()):
        raise ImageUnsafe(f"{name} lies outside the package")
    if not stat.S_ISREG(mode):
        raise ImageUnsupported(f"{name} is not a regular file")
    return real


def rel_name(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


def descriptor_extent_files(f: BinaryIO, name: str) -> list[str]:
    """The files that the VMDK descriptor in ``f`` names as its extents."""
    return [e.file for e in _parse_descriptor(_read_text(f, 0, name), name).extents if e.file]


def is_descriptor(head: bytes) -> bool:
    return head.startswith(_DESCRIPTOR_MAGIC)
