"""What goldclone writes into ``.vmx`` files: the template that points at the gold disks, and
each clone's confinement, NIC, CPUs and memory. Pure edits of a ``VmxFile``.

A ``.vmx`` from a package is untrusted: besides its disks (which the image checks cover) it
can name host files that VMware opens or writes when the VM runs: a CD-ROM image or host
drive, a floppy, serial or parallel port backed by a file, pipe or device, shared folders,
the NVRAM file, a raw disk. ``confine`` takes all of those out of a clone.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Final

from goldclone.drivers.base import MachineSpec
from goldclone.drivers.vmware.vmnet_leases import normal_mac
from goldclone.guest import guestinfo
from goldclone.images.checks import vmx_disks
from goldclone.images.vmx import VmxFile, read_vmx

STATIC_MAC_PREFIX: Final = "00:50:56"
"""VMware's range for manually set MACs is 00:50:56:00:00:00 to 00:50:56:3F:FF:FF."""
CONNECTION_TYPES: Final = {"bridged": "bridged", "nat": "nat", "hostonly": "hostonly"}
NIC_DEVICES: Final = ("e1000", "e1000e", "vmxnet3", "vmxnet", "vlance")

_STORAGE_SLOT = re.compile(r"((?:scsi|sata|ide|nvme)\d+:\d+)\.", re.IGNORECASE)
_HOST_PORT = re.compile(r"((?:floppy|serial|parallel)\d+)\.", re.IGNORECASE)
_NIC_KEY = re.compile(r"ethernet\d+\.", re.IGNORECASE)
_FILE_KEYS: Final = {"nvram", "workingdir", "checkpoint.vmstate", "sched.swap.dir"}
_DROPPED_PREFIXES: Final = ("sharedfolder", "usb.autoconnect.")


def template(gold_vmx: Path, package: Path) -> VmxFile:
    """The ``.vmx`` of a template of the gold VM at ``gold_vmx``, in a folder of its own.

    It is confined as a clone is, before VMware ever opens it, except that its hard disks may
    be anywhere inside ``package`` (the gold image's content): their file names are made
    absolute, so that the template uses the gold disks in place.
    """
    vmx = read_vmx(gold_vmx)
    confine(vmx, disk_allowed=lambda name: _inside(gold_vmx.parent / name, package))
    for slot, name in vmx_disks(vmx):
        vmx.set(f"{slot}.fileName", os.path.normpath(gold_vmx.parent / name))
    return vmx


def confine(vmx: VmxFile, disk_allowed: Callable[[str], bool] | None = None) -> None:
    """Take out of a ``.vmx`` everything that names a file outside the VM's folder.

    Only hard disks whose file is a ``.vmdk`` in the VM's folder stay (or, with
    ``disk_allowed``, a ``.vmdk`` whose file name it allows); any other storage device
    (CD-ROM, raw or absolute-path disk) is unplugged, and so is every floppy, serial and
    parallel port. Shared folders and USB auto-connect go, host-guest file sharing is switched
    off, and any other file setting with a path in it is removed.
    """
    keys = vmx.keys()
    slots = {match[1] for key in keys if (match := _STORAGE_SLOT.match(key))}
    disks = set()
    for slot in sorted(slots):
        if _local_disk(vmx, slot, disk_allowed or _local_name):
            disks.add(f"{slot}.filename".lower())
        else:
            _unplug(vmx, slot)
    for port in sorted({match[1] for key in keys if (match := _HOST_PORT.match(key))}):
        _unplug(vmx, port)
    for key in vmx:
        if key.lower() not in disks and _names_host_file(key, vmx.get(key) or ""):
            vmx.delete(key)
    vmx.set("isolation.tools.hgfs.disable", "TRUE")


def set_nic(vmx: VmxFile, network_type: str, mac: str) -> None:
    """Give the VM exactly one NIC, ``ethernet0``, on ``network_type`` with the static ``mac``.

    The gold's ``virtualDev`` stays if it is a known one, since the guest has its driver.
    """
    device = (vmx.get("ethernet0.virtualDev") or "").lower()
    for key in vmx:
        if _NIC_KEY.match(key):
            vmx.delete(key)
    settings = {
        "present": "TRUE",
        "connectionType": CONNECTION_TYPES[network_type],
        "virtualDev": device if device in NIC_DEVICES else NIC_DEVICES[0],
        "addressType": "static",
        "address": mac,
        "startConnected": "TRUE",
    }
    for name, value in settings.items():
        vmx.set(f"ethernet0.{name}", value)


def nic_mac(vmx: VmxFile) -> str | None:
    """The MAC of ``ethernet0``, static or generated, if it has one."""
    mac = vmx.get("ethernet0.address") or vmx.get("ethernet0.generatedAddress")
    return normal_mac(mac) if mac else None


def set_machine(vmx: VmxFile, spec: MachineSpec) -> None:
    """CPUs, memory and name of the VM, what its guest is told (``guestinfo``, with the
    machine's name as ``guestinfo.goldclone.id``; any the package had go), and no question
    that could stop a headless start waiting for an answer."""
    for key in list(vmx):
        if key.lower().startswith(guestinfo.PREFIX):
            vmx.delete(key)
    for key, value in guestinfo.guestinfo(spec.guest).items():
        vmx.set(key, value)
    vmx.set("numvcpus", str(spec.cpus))
    vmx.delete("cpuid.coresPerSocket")  # a gold's value may not divide the requested CPUs
    vmx.set("memsize", str(spec.memory_mb))
    vmx.set("displayName", f"goldclone-{spec.machine}")
    vmx.set("guestinfo.goldclone.id", spec.machine)
    vmx.set("msg.autoAnswer", "TRUE")
    vmx.set("uuid.action", "create")


def fresh_mac(in_use: Collection[str]) -> str:
    """A random MAC in VMware's static range that is not in ``in_use``."""
    taken = {normal_mac(mac) for mac in in_use}
    while True:
        tail = secrets.randbelow(0x40_00_00).to_bytes(3, "big")
        mac = ":".join([STATIC_MAC_PREFIX, *(f"{byte:02x}" for byte in tail)])
        if mac not in taken:
            return mac


def _local_disk(vmx: VmxFile, slot: str, allowed: Callable[[str], bool]) -> bool:
    present = (vmx.get(f"{slot}.present") or "TRUE").strip().lower() != "false"
    name = vmx.get(f"{slot}.fileName") or ""
    kind = (vmx.get(f"{slot}.deviceType") or "disk").strip().lower()
    hard_disk = kind == "disk" or kind.endswith("harddisk")
    return present and hard_disk and name.lower().endswith(".vmdk") and allowed(name)


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path``, as written, lies inside ``folder``."""
    return Path(os.path.normpath(path)).is_relative_to(os.path.normpath(folder))


def _unplug(vmx: VmxFile, device: str) -> None:
    prefix = f"{device.lower()}."
    for key in vmx:
        if key.lower().startswith(prefix):
            vmx.delete(key)
    vmx.set(f"{device}.present", "FALSE")


def _names_host_file(key: str, value: str) -> bool:
    """Whether ``key`` shares host folders or devices, or names a file outside the VM's."""
    lower = key.lower()
    if lower.startswith(_DROPPED_PREFIXES):
        return True
    names_file = lower.endswith(("filename", "file")) or lower in _FILE_KEYS
    return names_file and not _local_name(value)


def _local_name(value: str) -> bool:
    """Whether ``value`` is a plain file name, which VMware takes inside the VM's folder."""
    return bool(value) and not any(sep in value for sep in "/\\") and value not in (".", "..")
