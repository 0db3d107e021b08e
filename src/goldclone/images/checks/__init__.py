"""Find the VM in an unpacked package, and check its disks' headers before QEMU sees them."""

from goldclone.images.checks.disks import (
    SNIFF_BYTES,
    DiskFormat,
    DiskImage,
    check_disk,
    check_qcow2_header,
    sniff_disk,
    virtual_size,
)
from goldclone.images.checks.packages import Package, inspect_package, vmx_disks

__all__ = [
    "SNIFF_BYTES",
    "DiskFormat",
    "DiskImage",
    "Package",
    "check_disk",
    "check_qcow2_header",
    "inspect_package",
    "sniff_disk",
    "virtual_size",
    "vmx_disks",
]
