"""A synthetic driver: machines that exist only in this process, for tests of the API and the
service, and for trying the API on a host without root or QEMU.

It follows the ``Driver`` contract exactly (a clone needs its gold image, a NIC needs a clone, a
machine gets an address only while it runs, removal is safe to repeat, orphans are searched
before the store is asked) and keeps each machine's folder under ``vms/`` like the real
drivers, so that "nothing left behind" can be checked the same way. Its machines live in a
``SyntheticHost``, which a test can share between two services to stand for a host that outlives
a restart, and which can be told to fail a step or to power a guest off.

Addresses come from 198.18.0.0/15, the range reserved for benchmarks: they reach nothing.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Literal

from goldclone.drivers.base import (
    Capabilities,
    MachineSpec,
    Runtime,
    TemplateFiles,
    UnwatchedDisks,
    is_vm_id,
    unless_exited,
)
from goldclone.egress import DEFAULT_REACH, Reach
from goldclone.errors import (
    BootFailed,
    CloneFailed,
    ExecUnavailable,
    GoldcloneError,
    IPTimeout,
    NetworkFailed,
)
from goldclone.guest.channel import Streams
from goldclone.guest.config import GuestConfig
from goldclone.images.gold import GoldImage

Step = Literal["clone", "attach", "start", "destroy"]
ADDRESSES = IPv4Network("198.18.0.0/15")


@dataclass
class Machine:
    name: str
    gold: str
    disk: Path | None = None
    """Its gold image's disk: what an export starts from."""
    disk_bytes: int | None = None
    """The size it was cloned at, if grown."""
    runtime: Runtime | None = None
    spec: MachineSpec | None = None
    ip: str | None = None
    running: bool = False
    powered_off: bool = False
    """Whether it stopped because its guest powered off (``SyntheticHost.power_off``)."""
    booted: asyncio.Event = field(default_factory=asyncio.Event)
    personalized: GuestConfig | None = None
    """The identity a restored machine was given last."""
    personalizations: list[bool] = field(default_factory=list)
    """``new_machine`` of each time it was given an identity."""
    reaches: list[Reach] = field(default_factory=list)
    """What its NIC was given to reach: at its attach, then at each change."""
    helpers: list[asyncio.subprocess.Process] = field(default_factory=list)
    """The helper processes that stand for its guest's (``SyntheticHost.runs_commands``)."""


@dataclass
class SyntheticHost:
    """The machines of one synthetic host, and how its guests behave.

    ``boot_seconds`` is how long a started guest takes to get its address; with ``gets_ip``
    false, guests never get one; with ``has_agent`` false, none has a guest agent.
    ``faults`` fail the next call of a step with the error given. With ``runs_commands``, a
    running machine's guest helper (``guest.helper``) is run on this host, as the service's
    user: a request's commands run on the host itself, so only tests turn it on.
    """

    boot_seconds: float = 0.0
    gets_ip: bool = True
    has_agent: bool = True
    runs_commands: bool = False
    machines: dict[str, Machine] = field(default_factory=dict)
    faults: dict[Step, GoldcloneError] = field(default_factory=dict)
    _next_address: int = 1

    def fail_next(self, step: Step, error: GoldcloneError) -> None:
        self.faults[step] = error

    def power_off(self, name: str) -> None:
        """The guest powers itself off, as after ``poweroff`` inside it."""
        self.machines[name].running = False
        self.machines[name].powered_off = True

    def crash(self, name: str) -> None:
        """The hypervisor dies under the guest, as when it is killed."""
        self.machines[name].running = False

    def running(self) -> set[str]:
        return {name for name, machine in self.machines.items() if machine.running}

    def check_fault(self, step: Step) -> None:
        """Raise the error set for ``step``, once."""
        if (error := self.faults.pop(step, None)) is not None:
            raise error

    def _address(self) -> str:
        address = IPv4Address(int(ADDRESSES.network_address) + self._next_address)
        self._next_address += 1
        return str(address)


class SyntheticDriver(UnwatchedDisks):
    name = "synthetic"

    def __init__(
        self,
        data_dir: Path,
        host: SyntheticHost | None = None,
        network_types: tuple[str, ...] = ("nat", "hostonly"),
    ) -> None:
        self._vms_dir = data_dir.absolute() / "vms"
        self.host = host or SyntheticHost()
        self._capabilities = Capabilities(
            network_types=network_types,
            package_kinds=frozenset({"disk", "vmx"}),
            memory_templates=True,
            guest_agent=True,
            walls=True,  # its machines have no network to reach anything through
            grow_disks=True,
            unavailable_networks={
                t: f"'{t}' is not offered by this synthetic host"
                for t in ("bridged", "nat", "hostonly")
                if t not in network_types
            },
        )

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    async def claim(self) -> None:
        """Nothing is shared."""

    async def prepare(self) -> None:
        self._vms_dir.mkdir(parents=True, exist_ok=True)

    def runtime_from_record(self, machine: str, record: Mapping[str, str]) -> Runtime:
        return Runtime(record.get("machine", machine), record["network_type"], record["mac"])

    async def clone(
        self,
        machine: str,
        gold: GoldImage,
        template: TemplateFiles | None = None,
        disk_bytes: int | None = None,
    ) -> None:
        self.host.check_fault("clone")
        if not gold.disk.path.is_file():
            raise CloneFailed(f"the gold image's disk {gold.disk.path.name} is missing")
        if template is not None and not template.disk.is_file():
            raise CloneFailed(f"the template's disk {template.disk} is missing")
        if machine in self.host.machines:
            raise CloneFailed(f"machine {machine} exists already")
        folder = self._vms_dir / machine
        folder.mkdir(parents=True, mode=0o700)
        (folder / "clone").write_text(gold.key)
        self.host.machines[machine] = Machine(machine, gold.key, gold.disk.path, disk_bytes)

    async def set_reach(self, runtime: Runtime, reach: Reach) -> Runtime:
        self._machine(runtime.machine).reaches.append(reach)
        return runtime

    async def dropped(self, machine: str | None = None) -> dict[str, int] | None:
        return {}

    async def attach(
        self, machine: str, network_type: str, reach: Reach = DEFAULT_REACH
    ) -> Runtime:
        self.host.check_fault("attach")
        if network_type not in self._capabilities.network_types:
            raise NetworkFailed(f"network {network_type!r} is not offered here")
        taken = {m.runtime.mac for m in self.host.machines.values() if m.runtime is not None}
        while (mac := "02:00:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))) in taken:
            pass
        runtime = Runtime(machine, network_type, mac)
        self._machine(machine).runtime = runtime
        self._machine(machine).reaches.append(reach)
        return runtime

    async def start(self, spec: MachineSpec, runtime: Runtime) -> None:
        self.host.check_fault("start")
        machine = self._machine(spec.machine)
        if machine.runtime != runtime:
            raise BootFailed(f"machine {spec.machine} has no NIC {runtime.mac}")
        if spec.restore and (spec.template is None or not spec.template.state.is_file()):
            raise BootFailed("the template to restore from has no saved state")
        machine.spec, machine.running = spec, True
        how = "restored" if spec.restore else "powered on"
        self._say(spec.machine, f"synthetic machine {spec.machine} {how}, {spec.cpus} CPU(s)")
        if self.host.gets_ip:
            asyncio.get_running_loop().call_later(self.host.boot_seconds, self._boot, machine)

    def _boot(self, machine: Machine) -> None:
        if machine.running:
            machine.ip = self.host._address()
            self._say(machine.name, f"got the address {machine.ip}")
            machine.booted.set()

    def _say(self, machine: str, line: str) -> None:
        """A line on the machine's console, as a guest's boot messages would be."""
        with self.console_path(machine).open("a") as console:
            console.write(line + "\r\n")

    async def wait_for_ip(self, runtime: Runtime, timeout: float) -> str:
        machine = self._machine(runtime.machine)

        async def address() -> str:
            try:
                await asyncio.wait_for(machine.booted.wait(), timeout)
            except TimeoutError:
                raise IPTimeout(f"the guest got no address within {timeout:g} s") from None
            assert machine.ip is not None
            return machine.ip

        return await unless_exited(
            address(), lambda: self.is_running(runtime.machine), "the guest got an IP"
        )

    def console_path(self, machine: str) -> Path:
        return self._vms_dir / machine / "console.log"

    async def is_running(self, machine: str) -> bool:
        found = self.host.machines.get(machine)
        return found is not None and found.running

    async def powered_off(self, machine: str) -> bool:
        found = self.host.machines.get(machine)
        return found is not None and found.powered_off

    async def agent_ping(self, runtime: Runtime) -> bool:
        """The synthetic guest's agent answers once it has its address, if the host says
        guests have one."""
        machine = self.host.machines.get(runtime.machine)
        return self.host.has_agent and machine is not None and machine.ip is not None

    async def settle(self, runtime: Runtime, timeout: float) -> None:
        """A synthetic guest has nothing left to start."""

    async def save_template(self, machine: str, runtime: Runtime, files: TemplateFiles) -> None:
        """The machine stops, leaving its disk, RAM and state in ``files``, read-only."""
        found = self._machine(machine)
        if not found.running:
            raise BootFailed(f"machine {machine} is not running")
        found.running = False
        for path in (files.disk, files.ram, files.state):
            path.write_text(f"{found.gold} {found.spec}")
            path.chmod(0o400)

    async def personalize(
        self, runtime: Runtime, guest: GuestConfig, timeout: float, new_machine: bool = True
    ) -> None:
        """The restored guest takes ``guest``'s identity, if it has an agent to be told by."""
        machine = self._machine(runtime.machine)
        if not self.host.has_agent:
            raise BootFailed("the restored guest could not be given its identity: no agent")
        machine.personalized = guest
        machine.personalizations.append(new_machine)

    async def adopt(self, runtime: Runtime) -> None:
        """Nothing to take over: the machine lives in the host object, if it is there."""

    async def open_channel(self, machine: str) -> Streams:
        """A new helper process on this host for each connection, ending with it."""
        found = self.host.machines.get(machine)
        if not self.host.runs_commands:
            raise ExecUnavailable("the synthetic driver's guests run no commands")
        if found is None or not found.running:
            raise ExecUnavailable(f"machine {machine} is not running")
        ours, theirs = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "goldclone.guest.helper", "--fd", str(theirs.fileno()),
                pass_fds=[theirs.fileno()], stdin=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
        finally:
            theirs.close()
        found.helpers.append(process)
        return await asyncio.open_unix_connection(sock=ours)

    async def export_disk(self, machine: str, dest: Path) -> str:
        """Its gold disk, with the machine's name written where the guest would have written
        (the second sector): each machine's disk is its own."""
        found = self._machine(machine)
        if found.disk is None:
            raise CloneFailed(f"machine {machine} was made with no disk")
        found.running = False
        disk = bytearray(await asyncio.to_thread(found.disk.read_bytes))
        disk[512 : 512 + len(machine)] = machine.encode()
        await asyncio.to_thread(dest.write_bytes, bytes(disk))
        return "raw"

    async def destroy(
        self, machine: str, runtime: Runtime | None, *, graceful: bool = True
    ) -> None:
        self.host.check_fault("destroy")
        if (found := self.host.machines.get(machine)) is not None:
            for process in found.helpers:  # each ends what it runs on SIGTERM
                if process.returncode is None:
                    process.terminate()
                await process.wait()
        await asyncio.to_thread(shutil.rmtree, self._vms_dir / machine, ignore_errors=True)
        self.host.machines.pop(machine, None)  # last: a machine that is gone has no folder

    async def remove_orphans(self, known_machines: Callable[[], Awaitable[set[str]]]) -> None:
        found = set(self.host.machines)
        found |= {entry.name for entry in self._vms_dir.glob("*") if is_vm_id(entry.name)}
        for machine in sorted(found - await known_machines()):
            await self.destroy(machine, None)

    async def close(self, vms_running: bool) -> None:
        """Nothing to release."""

    async def health(self) -> dict[str, str | None]:
        return {}

    def _machine(self, name: str) -> Machine:
        try:
            return self.host.machines[name]
        except KeyError:
            raise BootFailed(f"machine {name} was never cloned") from None
