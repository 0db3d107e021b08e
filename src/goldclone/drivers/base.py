"""The seam between the VM service and a hypervisor."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from goldclone.images.diskcheck import DiskImage
from goldclone.network import Attachment


@dataclass(frozen=True)
class MachineSpec:
    """What one VM is to be: its size, its network attachment and its display."""

    vm_id: str
    cpus: int
    memory_mb: int
    headless: bool
    attachment: Attachment


class Driver(Protocol):
    """One hypervisor's work. Every method is idempotent where it removes something."""

    name: str

    async def prepare(self) -> None:
        """Check the hypervisor and settle its options, once, before the first VM."""

    async def clone(self, vm_id: str, gold: DiskImage) -> None:
        """Make the VM's linked clone of the gold disk."""

    async def start(self, spec: MachineSpec) -> None:
        """Boot the clone. The driver finds a started VM again by its ID alone."""

    async def is_running(self, vm_id: str) -> bool:
        """Whether the VM's hypervisor process is alive."""

    async def destroy(self, vm_id: str) -> None:
        """Stop the VM (cleanly, then hard) and remove every file it had."""

    async def list_vms(self) -> list[str]:
        """The IDs of the VMs this driver finds on disk."""

    def vm_dir(self, vm_id: str) -> Path:
        """The folder that holds everything of one VM."""
