"""The QEMU driver: qcow2 linked clones, guests that outlive the service, QMP control.

Each machine lives in ``vms/<name>/`` (``command.MachineFiles``). QEMU runs in a session of its
own (``launch``), so guests outlive the service, and a restarted service finds them again
through the pidfile and the socket.

A qemu is this driver's when its command line carries ``-pidfile <data dir>/vms/<id>/qemu.pid``
and ``-name goldclone-<id>``; that is how ``destroy`` finds one that has not written its pidfile
yet, and how ``remove_orphans`` finds one whose VM the store has forgotten. Processes are only
ever signalled by PID.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import NamedTuple

from goldclone.drivers.base import (
    Capabilities,
    MachineSpec,
    Runtime,
    TemplateFiles,
    is_vm_id,
    unless_exited,
)
from goldclone.drivers.qemu import command, disks, launch, memory, personalizing
from goldclone.drivers.qemu import hardware as hardwares
from goldclone.drivers.qemu.accel import choose_accel
from goldclone.drivers.qemu.agent import AgentLink
from goldclone.drivers.qemu.bounds import UNLIMITED, DiskRate, MachineBounds
from goldclone.drivers.qemu.command import MachineFiles, QemuCommand
from goldclone.drivers.qemu.consoles import keep_consoles
from goldclone.drivers.qemu.hardware import Hardware
from goldclone.drivers.qemu.network import Attachment, Networks
from goldclone.drivers.qemu.network.manager import tap_name
from goldclone.drivers.qemu.qmp import qmp_execute
from goldclone.egress import DEFAULT_REACH, Reach
from goldclone.errors import (
    BootFailed,
    CloneFailed,
    CommandError,
    DriverUnavailable,
    ExecUnavailable,
    NotReady,
    QMPError,
)
from goldclone.guest import settling
from goldclone.guest.channel import Streams
from goldclone.guest.config import GuestConfig
from goldclone.guest.nocloud import write_seed
from goldclone.host import processes
from goldclone.host.files import write_atomically
from goldclone.images.gold import GoldImage
from goldclone.polling import until
from goldclone.settings import NETWORK_TYPES

log = logging.getLogger(__name__)

# Linux limits a unix socket path to 107 bytes; qmp.sock sits this deep below the data dir.
MAX_DATA_DIR_LENGTH = 107 - len("/vms/00000000-0000-0000-0000-000000000000/qmp.sock")
KILL_GRACE = 5.0
START_TIMEOUT = 30.0
"""Seconds a QEMU has to write its pidfile and make its sockets."""


class QemuDriver:
    name = "qemu"

    def __init__(
        self,
        data_dir: Path,
        networks: Networks,
        qemu_binary: str = "qemu-system-x86_64",
        accel: str = "auto",
        shutdown_timeout: float = 10.0,
        run_as: str | None = None,
        memory_overhead_mb: int = 256,
        tcg_cache_mb: int = 128,
        console_max_bytes: int = 8 << 20,
        disk_rate: DiskRate = UNLIMITED,
    ) -> None:
        self._vms_dir = data_dir.absolute() / "vms"
        self.bounds = MachineBounds(data_dir, memory_overhead_mb, tcg_cache_mb, disk_rate)
        self._console_max = console_max_bytes
        self._consoles: asyncio.Task[None] | None = None
        self._networks = networks
        self._command = QemuCommand(qemu_binary, run_as)
        self._accel_setting = accel
        self._accel = "tcg"
        self._shutdown_timeout = shutdown_timeout
        self._supervisor: asyncio.Task[None] | None = None
        self._agents: dict[str, AgentLink] = {}
        if len(str(data_dir.absolute())) > MAX_DATA_DIR_LENGTH:
            raise DriverUnavailable(
                f"the data dir {data_dir.absolute()} is {len(str(data_dir.absolute()))} "
                f"characters long, too long for the VMs' sockets under it (unix socket paths "
                f"end at 107): choose one of at most {MAX_DATA_DIR_LENGTH}"
            )
        unavailable = networks.unavailable()
        self._capabilities = Capabilities(
            network_types=tuple(t for t in NETWORK_TYPES if t not in unavailable),
            package_kinds=frozenset({"disk", "vmx"}),
            memory_templates=True,
            guest_agent=True,
            walls=True,
            grow_disks=True,
            unavailable_networks=unavailable,
        )

    @property
    def capabilities(self) -> Capabilities:
        """Every network type that is configured here; disk images and VMware folders alike
        (of a ``.vmx`` package, only its disk is booted)."""
        return self._capabilities

    async def claim(self) -> None:
        """Refuse to serve where a bridge of an owned network is another service's."""
        await self._networks.claim()

    async def prepare(self) -> None:
        """Choose the accelerator once, make the machines' parent cgroups, and start watching
        the networks."""
        self._accel = await choose_accel(self._accel_setting, self._command.binary)
        await self.bounds.prepare()
        self._supervisor = asyncio.create_task(self._networks.supervise(), name="networks")
        self._consoles = asyncio.create_task(
            keep_consoles(self._vms_dir, self._console_max), name="consoles"
        )

    def runtime_from_record(self, machine: str, record: Mapping[str, str]) -> Attachment:
        return Attachment.from_record(machine, record)

    def vm_dir(self, machine: str) -> Path:
        return self._vms_dir / machine

    def files(self, machine: str) -> MachineFiles:
        return MachineFiles(self.vm_dir(machine))

    async def clone(
        self,
        machine: str,
        gold: GoldImage,
        template: TemplateFiles | None = None,
        disk_bytes: int | None = None,
    ) -> None:
        """A qcow2 overlay on the gold disk, or a copy of ``template``'s empty overlay on its
        frozen disk (already of the template's size): the same bytes for every clone, and no
        process to start for each."""
        vm_dir = self.vm_dir(machine)
        vm_dir.mkdir(parents=True, mode=0o700)
        if template is not None:
            try:
                if await asyncio.to_thread(
                    disks.copy_if_present, template.overlay, self.files(machine).disk
                ):
                    return
            except OSError as exc:
                raise CloneFailed(f"could not copy the template's disk: {exc.strerror}") from exc
            await disks.overlay(template.disk, "qcow2", self.files(machine).disk)
        else:
            base = gold.disk.path.absolute()
            await disks.overlay(base, gold.disk.format, self.files(machine).disk, disk_bytes)

    async def attach(
        self, machine: str, network_type: str, reach: Reach = DEFAULT_REACH
    ) -> Attachment:
        return await self._networks.attach(network_type, machine, reach)

    async def set_reach(self, runtime: Runtime, reach: Reach) -> Attachment:
        return await self._networks.set_reach(_nic(runtime), reach)

    async def dropped(self, machine: str | None = None) -> dict[str, int] | None:
        if machine is None:
            return self._networks.walls.dropped_by_reason()
        return self._networks.walls.dropped(tap_name(machine))

    def command_line(
        self, spec: MachineSpec, runtime: Runtime, hardware: Hardware = hardwares.CURRENT
    ) -> list[str]:
        """The qemu command that boots ``spec``'s clone; every path in it is absolute."""
        accel, drive = self.bounds.accel(self._accel), self.bounds.disk.drive_options()
        files = self.files(spec.machine)
        return self._command.line(spec, _nic(runtime), files, accel, drive, hardware)

    def _write_guest_config(self, spec: MachineSpec, mac: str) -> None:
        files = self.files(spec.machine)
        write_seed(files.seed, spec.guest, mac)
        metadata = json.dumps(dict(spec.guest.metadata), sort_keys=True).encode()
        write_atomically(files.metadata, metadata, 0o600)

    async def start(self, spec: MachineSpec, runtime: Runtime) -> None:
        await asyncio.to_thread(self._write_guest_config, spec, _nic(runtime).mac)
        limit = self.bounds.memory_limit_mb(spec.memory_mb, self._accel)
        hardware = hardwares.CURRENT
        if spec.restore and spec.template is not None:
            hardware = await asyncio.to_thread(hardwares.of_template, spec.template)
        argv = [*command.scheduling(spec), *self.command_line(spec, runtime, hardware)]
        argv = await self.bounds.launch(spec.machine, spec.cpus, limit, argv)
        log = self.files(spec.machine).log
        try:
            await launch.launch(argv, log)
        except CommandError as exc:
            raise BootFailed(f"qemu did not start: {exc.stderr_line or exc.message}") from exc
        files = self.files(spec.machine)
        sockets = [files.qmp, files.agent, *([files.exec] if hardware.exec_port else [])]
        await launch.started(files.pidfile, sockets, log, START_TIMEOUT)
        if self._read_pid(spec.machine) is None:
            how = launch.ending(log)
            raise BootFailed(
                f"qemu started, then ended: {how.words if how else 'it is not running'}"
            )
        for socket in sockets:
            socket.chmod(0o600)
        if spec.restore:
            assert spec.template is not None
            try:
                await memory.restore(
                    self.files(spec.machine).qmp,
                    spec.template,
                    command.nic_options(_nic(runtime).mac),
                )
            except QMPError as exc:
                raise BootFailed(f"the template did not restore: {exc.message}") from exc

    async def settle(self, runtime: Runtime, timeout: float) -> None:
        """Wait, through the guest agent, until the guest's init has finished starting it."""
        try:
            await self.agent_link(runtime.machine).run_script(settling.SCRIPT, timeout)
        except QMPError as exc:
            raise NotReady(f"the guest did not finish starting: {exc.message}") from exc

    async def save_template(self, machine: str, runtime: Runtime, files: TemplateFiles) -> None:
        """Turn ``machine``, booted with its RAM in ``files.ram``, into that template: unplug
        its NIC, save its device state, stop it, and keep its disk, all read-only (0400).
        The machine itself is gone afterwards; ``destroy`` removes what is left of it."""
        pid = self._read_pid(machine)
        if pid is None:
            raise BootFailed("the template's qemu is not running")
        await memory.save(self.files(machine).qmp, command.NIC_ID, files)
        await processes.wait_exit(pid, KILL_GRACE)
        await asyncio.to_thread(os.replace, self.files(machine).disk, files.disk)
        await disks.overlay(files.disk, "qcow2", files.overlay)
        await asyncio.to_thread(hardwares.record, files, hardwares.CURRENT)
        for path in (files.disk, files.ram, files.state, files.overlay):
            path.chmod(0o400)

    async def personalize(
        self, runtime: Runtime, guest: GuestConfig, timeout: float, new_machine: bool = True
    ) -> None:
        """Through the guest agent of a restored machine: set its clock to the host's, make it
        a machine of its own if it is new (``identity.new_machine_script``), and write
        ``guest``'s identity into it (``identity.files``)."""
        link = self.agent_link(runtime.machine)
        try:
            await until(lambda: self.agent_ping(runtime), timeout=timeout, interval=0.1)
            await personalizing.personalize(link, guest, timeout, new_machine)
        except (TimeoutError, QMPError) as exc:
            raise BootFailed(f"the restored guest could not be given its identity: {exc}") from exc

    def _read_pid(self, machine: str) -> int | None:
        """The pid of this machine's qemu, if it is alive and really is that machine's."""
        try:
            pid = int(self.files(machine).pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        argv = processes.argv(pid)
        return pid if argv and command.option(argv, "-name") == f"goldclone-{machine}" else None

    async def _qemus(self, waiters: bool = False) -> list[_Qemu]:
        """Every live qemu of this driver (with ``waiters``, the shells that wait for them
        instead), found in ``/proc`` by a worker thread."""
        return await asyncio.to_thread(self._scan_qemus, waiters)

    def _scan_qemus(self, waiters: bool) -> list[_Qemu]:
        """Every live qemu of this driver: ``-name goldclone-<name>`` with its ``-pidfile`` in
        that machine's folder, whether or not it has written its pidfile yet; or the shells
        that ``launch`` left to wait for them, whose command line carries the same."""
        found = []
        for entry in Path("/proc").iterdir():
            argv = processes.argv(int(entry.name)) if entry.name.isdigit() else None
            if argv is None or launch.is_waiter(argv) != waiters:
                continue
            machine = (command.option(argv, "-name") or "").removeprefix("goldclone-")
            if is_vm_id(machine) and command.option(argv, "-pidfile") == str(
                self.files(machine).pidfile
            ):
                found.append(_Qemu(int(entry.name), machine, command.mac_in(argv)))
        return found

    async def wait_for_ip(self, runtime: Runtime, timeout: float) -> str:
        return await unless_exited(
            self._networks.wait_for_ip(_nic(runtime), timeout),
            lambda: self.is_running(runtime.machine),
            "the guest got an IP",
            lambda: self.exit_reason(runtime.machine),
        )

    async def is_running(self, machine: str) -> bool:
        return self._read_pid(machine) is not None

    async def agent_ping(self, runtime: Runtime) -> bool:
        """Whether qemu-guest-agent in the guest answers ``guest-ping`` on its virtio port."""
        try:
            await self.agent_link(runtime.machine).execute("guest-ping", timeout=2.0)
        except QMPError:
            return False
        return True

    def agent_link(self, machine: str) -> AgentLink:
        """The one connection to the machine's guest agent, kept while the machine lives; no
        other client can connect to the agent while it is open."""
        if (link := self._agents.get(machine)) is None:
            link = self._agents[machine] = AgentLink(self.files(machine).agent)
        return link

    def console_path(self, machine: str) -> Path:
        return self.files(machine).console

    async def adopt(self, runtime: Runtime) -> None:
        await self._networks.adopt(_nic(runtime))
        pid = self._read_pid(runtime.machine)
        argv = processes.argv(pid) if pid is not None else None
        if pid is not None and argv:  # its bounds, as its command line says
            cpus, memory_mb = (
                int(command.option(argv, "-smp") or 1),
                int(command.option(argv, "-m") or 0),
            )
            limit = self.bounds.memory_limit_mb(memory_mb, self._accel)
            await self.bounds.adopt(runtime.machine, pid, cpus, limit)

    async def open_channel(self, machine: str) -> Streams:
        """The helper's virtio-serial port, through QEMU's socket for it."""
        path = self.files(machine).exec
        if not await asyncio.to_thread(path.exists):
            raise ExecUnavailable(
                "the VM has no port for the goldclone helper: it was restored from a template "
                "made before goldclone had one (make a new template of its image)"
            )
        try:
            return await asyncio.open_unix_connection(path)
        except OSError as exc:
            raise ExecUnavailable(f"the VM's QEMU does not take connections: {exc}") from exc

    async def exit_reason(self, machine: str) -> str | None:
        """Why ``machine``'s QEMU ended: the kernel's kill at its memory limit, or how it
        ended and the last thing it said (``qemu.log``)."""
        if (reason := self.bounds.exit_reason(machine)) is not None:
            return reason
        how = await launch.ended(self.files(machine).log)
        return None if how is None else f"its QEMU ended: {how.words}"

    async def powered_off(self, machine: str) -> bool:
        """Whether ``machine``'s QEMU exited cleanly, as when its guest powers off (the
        service's own quit happens only as it destroys the machine)."""
        if self.bounds.exit_reason(machine) is not None:
            return False
        how = await launch.ended(self.files(machine).log)
        return how is not None and how.clean

    def disk_growth(self) -> int:
        return disks.growth_of_all(self._vms_dir)

    async def disk_stalled(self, machine: str) -> bool:
        return await disks.stalled(self.files(machine).qmp)

    async def resume(self, machine: str) -> None:
        await disks.resume(self.files(machine).qmp)

    async def export_disk(self, machine: str, dest: Path) -> str:
        if (pid := self._read_pid(machine)) is not None:
            await self._stop(machine, pid, self._shutdown_timeout)
        await disks.flatten(self.files(machine).disk, dest)
        return "qcow2"

    async def destroy(
        self, machine: str, runtime: Runtime | None, *, graceful: bool = True
    ) -> None:
        """Power off cleanly, then ``quit``, then SIGKILL; then remove the VM's folder and
        its NIC.

        Any other qemu of the VM (one that had not written its pidfile when its start was cut
        off) is killed too. Without ``runtime`` (the service stopped before recording it, or
        the store forgot the VM), the tap is the one named after the VM, and the MAC whose
        lease goes is read from its qemu's command line.
        """
        if (link := self._agents.pop(machine, None)) is not None:
            await link.close()
        qemus = [qemu for qemu in await self._qemus() if qemu.machine == machine]
        mac = next((qemu.mac for qemu in qemus if qemu.mac), None)
        pid = self._read_pid(machine)
        if pid is not None:
            await self._stop(machine, pid, self._shutdown_timeout if graceful else None)
        for qemu in qemus:
            if qemu.pid != pid:
                await processes.end(qemu.pid, (signal.SIGKILL,), KILL_GRACE)
        # its shell writes how it ended into the folder: it goes first
        for waiter in await self._qemus(waiters=True):
            if waiter.machine == machine and not await processes.wait_exit(waiter.pid, KILL_GRACE):
                await processes.end(waiter.pid, (signal.SIGKILL,), KILL_GRACE)
        await asyncio.to_thread(shutil.rmtree, self.vm_dir(machine), ignore_errors=True)
        await self.bounds.release(machine)
        if runtime:
            await self._networks.detach(_nic(runtime))
        else:
            await self._networks.forget(tap_name(machine), mac)

    async def remove_orphans(self, known_machines: Callable[[], Awaitable[set[str]]]) -> None:
        """Destroy every machine with a qemu or a folder here that ``known_machines()`` does
        not name, and remove the VM taps on the owned bridges that belong to no known one."""
        found = {qemu.machine for qemu in await self._qemus()}
        found |= {entry.name for entry in self._vms_dir.glob("*") if is_vm_id(entry.name)}
        taps = await self._networks.vm_taps()
        grouped = self.bounds.machines()
        known = await known_machines()
        for machine in sorted(found - known):
            log.warning("VM %s is not in the store; removing what is left of it", machine)
            await self.destroy(machine, None)
        for tap in taps - {tap_name(machine) for machine in known | found}:
            log.warning("tap %s belongs to no VM in the store; removing it", tap)
            await self._networks.forget(tap, None)
        for machine in sorted(grouped - known - found):
            await self.bounds.release(machine)

    async def close(self, vms_running: bool) -> None:
        """Keep the networks up for running guests; otherwise remove them."""
        for task in (self._supervisor, self._consoles):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._supervisor = self._consoles = None
        for link in self._agents.values():
            await link.close()
        self._agents.clear()
        if vms_running:
            await self._networks.close()
        else:
            await self._networks.teardown()
            await self.bounds.close()

    async def health(self) -> dict[str, str | None]:
        return await self._networks.health()

    async def _stop(self, machine: str, pid: int, shutdown_timeout: float | None) -> None:
        """Power off (unless ``shutdown_timeout`` is None), then ``quit``, then SIGKILL."""
        qmp = self.files(machine).qmp
        steps = [("quit", 3.0)]
        if shutdown_timeout is not None:
            steps.insert(0, ("system_powerdown", shutdown_timeout))
        for step, grace in steps:
            try:
                await qmp_execute(qmp, step, timeout=2.0)
            except QMPError as exc:
                # A monitor that did not take the command (hung, or a stopped process) will
                # not act on it either: waiting out its grace would only delay the next step.
                log.info("VM %s: %s", machine, exc)
                continue
            if await processes.wait_exit(pid, grace):
                return
        log.warning("VM %s: qemu %d did not stop, killing it", machine, pid)
        await processes.end(pid, (signal.SIGKILL,), KILL_GRACE)


class _Qemu(NamedTuple):
    pid: int
    machine: str
    mac: str | None


def _nic(runtime: Runtime) -> Attachment:
    if not isinstance(runtime, Attachment):
        raise TypeError(f"the qemu driver was given another driver's runtime: {runtime!r}")
    return runtime
