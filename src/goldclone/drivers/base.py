"""The seam between the VM service and a hypervisor.

A driver works on *machines*: the host-side half of a VM, known by a name that the service
chooses (today the VM's ID; a pooled machine keeps its own name when a request claims it). It
declares what it can do in ``Capabilities``, and hands the service a typed ``Runtime`` for each
machine, which the service stores without looking inside and gives back after a restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, TypeVar

from goldclone.egress import DEFAULT_REACH, Reach
from goldclone.errors import BootFailed, ExecUnavailable, InvalidRequest
from goldclone.guest.channel import Streams
from goldclone.guest.config import GuestConfig
from goldclone.images.gold import GoldImage
from goldclone.polling import until

PackageKind = Literal["disk", "vmx"]
"""``disk``: a bare disk image (qcow2, VMDK, raw); ``vmx``: a VMware VM folder (a ``.vmx`` and
its disks)."""

PROCESS_CHECK_INTERVAL = 0.5
T = TypeVar("T")


def is_vm_id(name: str) -> bool:
    """Whether ``name`` is a VM ID as the service makes them (a UUID, lowercase, with dashes),
    so that a folder or process found on the host can be told apart from anything else."""
    try:
        return str(uuid.UUID(name)) == name
    except ValueError:
        return False


def package_kind(gold: GoldImage) -> PackageKind:
    return "vmx" if gold.vmx is not None else "disk"


@dataclass(frozen=True)
class Capabilities:
    """What a driver can do on this host.

    ``network_types`` are the types VMs can use here; ``unavailable_networks`` maps each type
    the driver knows but cannot offer here to the reason, for the error a request gets.
    ``grow_disks`` says whether a clone's disk can be made larger than its image's.
    ``memory_templates`` says whether the driver can start a machine from a saved, booted
    template instead of a cold boot; ``guest_agent`` whether it can ping a QEMU guest agent in
    the guest; ``walls`` whether it enforces a ``Reach`` (groups and egress) on its own
    networks.
    """

    network_types: tuple[str, ...]
    package_kinds: frozenset[PackageKind]
    memory_templates: bool = False
    guest_agent: bool = False
    walls: bool = False
    grow_disks: bool = False
    unavailable_networks: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TemplateFiles:
    """A memory template in ``folder``: the frozen disk, RAM and device state of a booted
    guest, from which machines of the same shape start without booting."""

    folder: Path

    @property
    def disk(self) -> Path:
        return self.folder / "disk.qcow2"

    @property
    def ram(self) -> Path:
        return self.folder / "ram"

    @property
    def state(self) -> Path:
        return self.folder / "state"

    @property
    def hardware(self) -> Path:
        """The virtual hardware the template was made with (absent: before it was recorded)."""
        return self.folder / "hardware.json"

    @property
    def overlay(self) -> Path:
        """An empty qcow2 overlay on ``disk``: what every machine restored from the template
        starts as, copied (templates of earlier releases have none)."""
        return self.folder / "overlay.qcow2"


@dataclass(frozen=True)
class MachineSpec:
    """What one machine is to be, and what its guest is told about itself.

    With ``template``, the machine's RAM is that template's RAM file: shared and written, for
    the machine that becomes the template (``restore`` false), or mapped privately, copy on
    write, for one restored from it (``restore`` true).
    """

    machine: str
    cpus: int
    memory_mb: int
    headless: bool
    guest: GuestConfig
    template: TemplateFiles | None = None
    restore: bool = False


@dataclass(frozen=True)
class Runtime:
    """What a driver needs to find a machine's parts again: its name and its NIC. Drivers
    subclass it with what else they need (the QEMU driver: the tap and the bridge)."""

    machine: str
    network_type: str
    mac: str

    def record(self) -> dict[str, str]:
        """The runtime as JSON-friendly strings, for the store."""
        return {name: str(value) for name, value in dataclasses.asdict(self).items()}


class Driver(Protocol):
    """One hypervisor's work. Every method that removes something is safe to repeat."""

    name: str

    @property
    def capabilities(self) -> Capabilities: ...

    async def claim(self) -> None:
        """Refuse, with ``DriverUnavailable``, to use a shared host part (a bridge) that
        another service owns. Cheap and safe to repeat: a server calls it before it serves."""

    async def prepare(self) -> None:
        """Check the hypervisor and settle its options, once, before the first VM."""

    def runtime_from_record(self, machine: str, record: Mapping[str, str]) -> Runtime:
        """Rebuild a ``Runtime`` from its ``record()``; ``machine`` names it when the record
        was written before runtimes carried their machine's name."""
        ...

    async def clone(
        self,
        machine: str,
        gold: GoldImage,
        template: TemplateFiles | None = None,
        disk_bytes: int | None = None,
    ) -> None:
        """Make the machine's linked clone of the gold image, whose kind the driver takes, or
        of ``template``'s frozen disk (only with ``capabilities.memory_templates``), its disk
        grown to ``disk_bytes`` (only with ``capabilities.grow_disks``; never below the
        image's size)."""

    async def attach(
        self, machine: str, network_type: str, reach: Reach = DEFAULT_REACH
    ) -> Runtime:
        """Give the machine a NIC with a fresh MAC on one of ``capabilities.network_types``,
        that may reach what ``reach`` says (with ``capabilities.walls``)."""
        ...

    async def set_reach(self, runtime: Runtime, reach: Reach) -> Runtime:
        """Change what the running machine's NIC may reach; return its runtime changed."""
        ...

    async def dropped(self, machine: str | None = None) -> dict[str, int] | None:
        """The packets that network rules have dropped, by reason: of what ``machine`` sent,
        or of all this host's machines together (some drops belong to no one machine).
        ``None`` for a driver without ``capabilities.walls``, or a machine without rules."""
        ...

    async def start(self, spec: MachineSpec, runtime: Runtime) -> None:
        """Boot the clone with its NIC; raises ``BootFailed`` if the hypervisor won't start."""

    async def wait_for_ip(self, runtime: Runtime, timeout: float) -> str:
        """The guest's IP address. Raises ``IPTimeout`` after ``timeout`` seconds and
        ``BootFailed`` as soon as the machine's hypervisor process exits."""
        ...

    async def is_running(self, machine: str) -> bool:
        """Whether the machine's hypervisor process is alive."""
        ...

    async def agent_ping(self, runtime: Runtime) -> bool:
        """Whether a guest agent in the machine answers a ping now; ``False`` for a driver
        without ``capabilities.guest_agent``."""
        ...

    def console_path(self, machine: str) -> Path | None:
        """The file that the machine's serial console is written to, if the driver keeps
        one."""
        ...

    async def settle(self, runtime: Runtime, timeout: float) -> None:
        """Wait until the running guest has finished starting up (under systemd: every boot
        job, cloud-init's among them), so that a template saved next holds no start-up work
        that each machine restored from it would do again. Raises ``NotReady`` if it has not
        within ``timeout``."""

    async def save_template(self, machine: str, runtime: Runtime, files: TemplateFiles) -> None:
        """Turn the running ``machine``, started with ``MachineSpec.template`` = ``files``,
        into that template (read-only files); the machine is stopped afterwards."""

    async def personalize(
        self, runtime: Runtime, guest: GuestConfig, timeout: float, new_machine: bool = True
    ) -> None:
        """Give a restored machine its own clock and ``guest``'s identity; and, if it is a
        ``new_machine`` just restored rather than one a pool kept, what makes it its own
        machine (new SSH host keys). Raises ``BootFailed`` if the guest cannot be told within
        ``timeout``."""

    async def adopt(self, runtime: Runtime) -> None:
        """Take over a machine that kept running through a restart of the service."""

    async def open_channel(self, machine: str) -> Streams:
        """A connection to the port of the goldclone helper (``guest.helper``) in the
        machine's guest; raises ``ExecUnavailable`` saying why the machine has none."""
        ...

    def disk_growth(self) -> int:
        """Bytes that the disks of this host's machines can still grow into; blocking."""
        ...

    async def disk_stalled(self, machine: str) -> bool:
        """Whether the machine is paused because its disk could not be written (the host's
        disk is full)."""
        ...

    async def resume(self, machine: str) -> None:
        """Let a machine that ``disk_stalled`` run again."""

    async def exit_reason(self, machine: str) -> str | None:
        """Why the machine's hypervisor process ended, when the driver knows more than that
        it did (the kernel killed it at its memory limit); ``None`` otherwise."""
        ...

    async def powered_off(self, machine: str) -> bool:
        """Whether the machine's hypervisor ended because its guest powered itself off, not by
        a crash, a kill or a limit; ``False`` when the driver cannot tell."""
        ...

    async def export_disk(self, machine: str, dest: Path) -> str:
        """Stop the machine cleanly (as ``destroy`` starts) and write its disk to ``dest``,
        flattened: a disk of its own, with no backing file; its format. The machine keeps
        everything else until it is destroyed."""
        ...

    async def destroy(
        self, machine: str, runtime: Runtime | None, *, graceful: bool = True
    ) -> None:
        """Stop the machine (cleanly, then hard; at once without ``graceful``, for a guest
        that has not finished booting and would not act on the power button) and remove
        everything it had, even when the service stopped before ``runtime`` was recorded."""

    async def remove_orphans(self, known_machines: Callable[[], Awaitable[set[str]]]) -> None:
        """Destroy what this driver finds of machines that ``known_machines()`` does not name.

        The host is searched before ``known_machines`` is called, so a machine that is made
        meanwhile (it is recorded before it gets anything on the host) is never taken for an
        orphan.
        """

    async def close(self, vms_running: bool) -> None:
        """Release the driver's resources; shared ones stay while ``vms_running``."""

    async def health(self) -> dict[str, str | None]:
        """Each part the driver relies on, such as a network, and why it fails, or ``None``
        when it is fine. Cheap: no guest is asked anything."""
        ...


class NoChannel:
    """The answers of a driver with no channel into its guests, nor a disk it can export."""

    name: str

    async def open_channel(self, machine: str) -> Streams:
        raise ExecUnavailable(
            f"the {self.name} driver has no channel into its guests: reach them over SSH"
        )

    async def export_disk(self, machine: str, dest: Path) -> str:
        raise InvalidRequest(f"the {self.name} driver cannot make an image of a VM")


class UnwatchedDisks:
    """The answers of a driver that knows nothing of its machines' disks and exits beyond
    whether they run: their disks never grow and never stall them, and a stop has no reason
    but that the process ended (nor is it known to be a power-off)."""

    def disk_growth(self) -> int:
        return 0

    async def disk_stalled(self, machine: str) -> bool:
        return False

    async def resume(self, machine: str) -> None:
        """Nothing is ever stalled."""

    async def exit_reason(self, machine: str) -> str | None:
        return None

    async def powered_off(self, machine: str) -> bool:
        return False


async def unless_exited(
    work: Awaitable[T],
    is_running: Callable[[], Awaitable[bool]],
    what: str,
    reason: Callable[[], Awaitable[str | None]] | None = None,
) -> T:
    """``work``'s result, unless the machine's hypervisor process exits first, which is a
    ``BootFailed`` saying that it exited before ``what``, and why if ``reason`` knows."""

    async def exited() -> bool:
        return not await is_running()

    job = asyncio.ensure_future(work)
    watch: asyncio.Task[bool] = asyncio.create_task(until(exited, interval=PROCESS_CHECK_INTERVAL))
    try:
        done, _ = await asyncio.wait({job, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        job.cancel()
        watch.cancel()
        await asyncio.gather(job, watch, return_exceptions=True)
    if job in done:
        return job.result()
    why = await reason() if reason is not None else None
    raise BootFailed(
        f"the VM's hypervisor process exited before {what}" + (f"; {why}" if why else "")
    )
