"""Finding the VM in an unpacked package: one bare disk image, or a VMware VM (a ``.vmx`` and
the disks it names), each disk checked before QEMU sees it."""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from goldclone.errors import ImageUnsafe, ImageUnsupported
from goldclone.images.checks.disks import (
    SNIFF_BYTES,
    DiskImage,
    check_disk,
    descriptor_extent_files,
    is_descriptor,
    rel_name,
    sniff_disk,
)
from goldclone.images.damage import read_as_package
from goldclone.images.vmx import VmxFile

_MAX_VMX = 1 << 20
_VMX_DISK_KEY = re.compile(r"((?:scsi|sata|ide|nvme)\d+:\d+)\.filename", re.IGNORECASE)


@dataclass(frozen=True)
class Package:
    """What an unpacked package holds: its primary disk, and the ``.vmx`` of a VMware VM."""

    disk: DiskImage
    vmx: Path | None


def inspect_package(root: Path) -> Package:
    """Find and check the VM in the unpacked package under ``root``.

    A package with one ``.vmx`` file (at any depth) is a VMware VM: its primary disk is the
    first present ``scsi``/``sata``/``ide``/``nvme`` disk that names a ``.vmdk``, and every
    disk it names is checked. Otherwise the package must hold exactly one disk image,
    recognised by its header; the extent files of a VMDK descriptor don't count as disks.
    Other files, such as metadata, are ignored.

    Raises ``ImageUnsupported`` when there is no disk, or no single one, and whatever
    ``check_disk`` raises.
    """
    with read_as_package("the package"):
        return _inspect(root)


def _inspect(root: Path) -> Package:
    files = _regular_files(root)
    vmx_files = [path for path in files if path.suffix.lower() == ".vmx"]
    if len(vmx_files) > 1:
        names = ", ".join(rel_name(path, root) for path in vmx_files)
        raise ImageUnsupported(f"the package holds several .vmx files: {names}")
    if vmx_files:
        return _vmware_package(vmx_files[0], root)
    return Package(disk=check_disk(_only_disk(files, root), root), vmx=None)


def _regular_files(root: Path) -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for file in sorted(files):
            path = Path(folder, file)
            if stat.S_ISREG(path.lstat().st_mode):
                found.append(path)
    return found


def _only_disk(files: list[Path], root: Path) -> Path:
    disks = []
    extents: set[Path] = set()
    for path in files:
        with path.open("rb") as f:
            head = f.read(SNIFF_BYTES)
            if sniff_disk(head) is None:
                continue
            disks.append(path)
            if is_descriptor(head):
                extents.update(
                    path.parent / e for e in descriptor_extent_files(f, rel_name(path, root))
                )
    disks = [path for path in disks if path not in extents]
    if not disks:
        raise ImageUnsupported("the package holds no qcow2, VMDK or raw (MBR or GPT) disk image")
    if len(disks) > 1:
        names = ", ".join(rel_name(path, root) for path in disks)
        raise ImageUnsupported(f"the package holds several disk images: {names}")
    return disks[0]


def _vmware_package(vmx_path: Path, root: Path) -> Package:
    name = rel_name(vmx_path, root)
    with vmx_path.open("rb") as f:
        data = f.read(_MAX_VMX + 1)
    if len(data) > _MAX_VMX:
        raise ImageUnsupported(f"{name} is larger than 1 MiB")
    disks = [
        check_disk(_vmx_disk_path(vmx_path, value, root), root)
        for _, value in vmx_disks(VmxFile.parse(data))
    ]
    if not disks:
        raise ImageUnsupported(f"{name} names no VMDK disk")
    for disk in disks:
        if disk.format != "vmdk":
            raise ImageUnsupported(
                f"{rel_name(disk.path, root)} is named .vmdk, but is {disk.format}"
            )
    return Package(disk=disks[0], vmx=vmx_path)


def vmx_disks(vmx: VmxFile) -> list[tuple[str, str]]:
    """The present disks that name a ``.vmdk``, as ``(slot, file name)`` in file order; a slot
    is a device such as ``scsi0:0``."""
    disks = []
    for key in vmx:
        match = _VMX_DISK_KEY.fullmatch(key)
        value = vmx.get(key)
        if match is None or value is None or not value.lower().endswith(".vmdk"):
            continue
        present = vmx.get(f"{match[1]}.present")
        if present is None or present.strip().lower() != "false":
            disks.append((match[1], value))
    return disks


def _vmx_disk_path(vmx_path: Path, value: str, root: Path) -> Path:
    if value.startswith("/") or "\\" in value or "\x00" in value:
        raise ImageUnsafe(f"{rel_name(vmx_path, root)} names a disk outside its package: {value!r}")
    return vmx_path.parent / value
