"""The seam between the VM service and a hypervisor."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from goldclone.images.store import GoldImage

Runtime = dict[str, str]
"""What a driver needs to find a VM's parts again after a restart, such as its NIC.

The service records it in the store before the VM is started; ``runtime["mac"]`` is the MAC
address of the VM's NIC.
"""


def is_vm_id(name: str) -> bool:
    """Whether ``name`` is a VM ID as the service makes them (a UUID, lowercase, with dashes),
    so that a folder or process found on the host can be told apart from anything else."""
    try:
        return str(uuid.UUID(name)) == name
    except ValueError:
        return False


@dataclass(frozen=True)
class MachineSpec:
    """What one VM is to be."""

    vm_id: str
    cpus: int
    memory_mb: int
    headless: bool


class Driver(Protocol):
    """One hypervisor's work. Every method that removes something is safe to repeat."""

    name: str

    async def prepare(self) -> None:
        """Check the hypervisor and settle its options, once, before the first VM."""

    def check_network(self, network_type: str) -> None:
        """Raise ``InvalidRequest`` unless VMs can use ``network_type`` on this host."""

    async def clone(self, vm_id: str, gold: GoldImage) -> None:
        """Make the VM's linked clone of the gold image."""

    async def attach(self, vm_id: str, network_type: str) -> Runtime:
        """Give the VM a NIC with a fresh MAC on ``network_type``; return how to find it."""

    async def start(self, spec: MachineSpec, runtime: Runtime) -> None:
        """Boot the clone with its NIC."""

    async def wait_for_ip(self, vm_id: str, runtime: Runtime, timeout: float) -> str:
        """The guest's IP address; raises ``IPTimeout`` after ``timeout`` seconds."""

    async def is_running(self, vm_id: str) -> bool:
        """Whether the VM's hypervisor process is alive."""

    async def adopt(self, vm_id: str, runtime: Runtime) -> None:
        """Take over a VM that kept running through a restart of the service."""

    async def destroy(self, vm_id: str, runtime: Runtime | None) -> None:
        """Stop the VM (cleanly, then hard) and remove everything it had, even when the
        service stopped before ``runtime`` was recorded."""

    async def remove_orphans(self, known_ids: Callable[[], Awaitable[set[str]]]) -> None:
        """Destroy what this driver finds of VMs whose ID ``known_ids()`` does not return.

        The host is searched before ``known_ids`` is called, so a VM that is created meanwhile
        (it is recorded before it gets anything on the host) is never taken for an orphan.
        """

    async def close(self, vms_running: bool) -> None:
        """Release the driver's resources; shared ones stay while ``vms_running``."""
