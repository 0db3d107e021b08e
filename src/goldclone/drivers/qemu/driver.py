"""The QEMU driver: qcow2 linked clones, guests that outlive the service, QMP control.

Each machine lives in ``vms/<name>/``: ``disk.qcow2`` (the clone), ``seed.iso`` (its NoCloud
seed) and ``metadata.json`` (its ``metadata`` for fw_cfg), ``qmp.sock``, ``qga.sock``,
``qemu.pid``, ``console.log`` and ``qemu.log`` (what QEMU said, and how it ended). QEMU runs in
a session of its own (``launch``), so guests outlive the service, and a restarted service finds
them again through the pidfile and the socket.

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
import secrets
import shutil
import signal
import time
import uuid
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
from goldclone.drivers.qemu import disks, launch, memory
from goldclone.drivers.qemu.accel import choose_accel
from goldclone.drivers.qemu.agent import AgentLink
from goldclone.drivers.qemu.bounds import UNLIMITED, DiskRate, MachineBounds
from goldclone.drivers.qemu.consoles import keep_consoles
from goldclone.drivers.qemu.network import Attachment, Networks
from goldclone.drivers.qemu.network.manager import tap_name
from goldclone.drivers.qemu.qmp import qmp_execute
from goldclone.egress import DEFAULT_REACH, Reach
from goldclone.errors import (
    BootFailed,
    CloneFailed,
    CommandError,
    DriverUnavailable,
    NotReady,
    QMPError,
    QMPRefused,
)
from goldclone.guest import hostkeys, identity, settling
from goldclone.guest.config import GuestConfig
from goldclone.guest.nocloud import write_seed
from goldclone.host import processes
from goldclone.host.commands import run
from goldclone.host.files import write_atomically
from goldclone.images.cache import GoldImage
from goldclone.polling import until
from goldclone.settings import NETWORK_TYPES

log = logging.getLogger(__name__)

# Linux limits a unix socket path to 107 bytes; qmp.sock sits this deep below the data dir.
MAX_DATA_DIR_LENGTH = 107 - len("/vms/00000000-0000-0000-0000-000000000000/qmp.sock")
KILL_GRACE = 5.0
START_TIMEOUT = 30.0
"""Seconds a QEMU has to write its pidfile and make its sockets."""
PCI_NIC, PCI_DISK, PCI_SEED, PCI_SERIAL = "0x3", "0x4", "0x5", "0x6"
NIC_ID = "nic0"
CLOCK_TOLERANCE_NS = 500_000_000
CLOCK_TIMEOUT = 20.0
CLOCK_ATTEMPTS = 3
SEED_BYTES = 32
"""Bytes of the host's randomness a restored guest's random pool is reseeded with."""
GUEST_NICE = 10
"""Every guest's QEMU runs at this nice value, behind the service, its DHCP servers and the
commands it runs, which a host full of busy guests otherwise kept waiting for the CPU."""
FW_CFG_METADATA = "opt/goldclone/metadata"
"""The fw_cfg file with the VM's ``metadata`` as JSON; a Linux guest reads it at
``/sys/firmware/qemu_fw_cfg/by_name/opt/goldclone/metadata/raw`` (module ``qemu_fw_cfg``)."""


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
        self._run_as = run_as
        self._networks = networks
        self._qemu = qemu_binary
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
        self._accel = await choose_accel(self._accel_setting, self._qemu)
        await self.bounds.prepare()
        self._supervisor = asyncio.create_task(self._networks.supervise(), name="networks")
        self._consoles = asyncio.create_task(
            keep_consoles(self._vms_dir, self._console_max), name="consoles"
        )

    def runtime_from_record(self, machine: str, record: Mapping[str, str]) -> Attachment:
        return Attachment.from_record(machine, record)

    def vm_dir(self, machine: str) -> Path:
        return self._vms_dir / machine

    def _disk(self, machine: str) -> Path:
        return self.vm_dir(machine) / "disk.qcow2"

    def _qmp(self, machine: str) -> Path:
        return self.vm_dir(machine) / "qmp.sock"

    def _pidfile(self, machine: str) -> Path:
        return self.vm_dir(machine) / "qemu.pid"

    def _log(self, machine: str) -> Path:
        return self.vm_dir(machine) / "qemu.log"

    def _agent(self, machine: str) -> Path:
        return self.vm_dir(machine) / "qga.sock"

    def _seed(self, machine: str) -> Path:
        return self.vm_dir(machine) / "seed.iso"

    def _metadata(self, machine: str) -> Path:
        return self.vm_dir(machine) / "metadata.json"

    async def clone(
        self, machine: str, gold: GoldImage, template: TemplateFiles | None = None
    ) -> None:
        """A qcow2 overlay on the gold disk, or a copy of ``template``'s empty overlay on its
        frozen disk: the same bytes for every clone, and no process to start for each."""
        vm_dir = self.vm_dir(machine)
        vm_dir.mkdir(parents=True, mode=0o700)
        if template is not None:
            try:
                if await asyncio.to_thread(_copy_if_present, template.overlay, self._disk(machine)):
                    return
            except OSError as exc:
                raise CloneFailed(f"could not copy the template's disk: {exc.strerror}") from exc
        base, base_format = (
            (gold.disk.path.absolute(), gold.disk.format)
            if template is None
            else (template.disk, "qcow2")
        )
        await _create_overlay(base, base_format, self._disk(machine))

    async def attach(
        self, machine: str, network_type: str, reach: Reach = DEFAULT_REACH
    ) -> Attachment:
        return await self._networks.attach(network_type, machine, reach)

    async def set_reach(self, runtime: Runtime, reach: Reach) -> Attachment:
        return await self._networks.set_reach(_nic(runtime), reach)

    async def dropped(self, machine: str | None = None) -> dict[str, int] | None:
        if machine is None:
            return self._networks.dropped_by_reason()
        return self._networks.dropped(tap_name(machine))

    def command_line(self, spec: MachineSpec, runtime: Runtime) -> list[str]:
        """The qemu command that boots ``spec``'s clone; every path in it is absolute.

        Every PCI device has a fixed address, so that a template's saved device state loads
        into a machine restored from it; a restored machine gets its NIC only once it runs
        (``restore``), and a fresh VM generation ID, which tells its kernel to reseed its
        random number generator.
        """
        vm_dir = self.vm_dir(spec.machine)
        nic = _nic(runtime)
        display = ["-display", "none"] if spec.headless else [
            "-display", f"vnc=unix:{vm_dir / 'vnc.sock'}",
        ]  # fmt: skip
        generation = f",guid={uuid.uuid4()}" if spec.restore else ""
        return [
            self._qemu,
            "-name", f"goldclone-{spec.machine}",
            "-accel", self.bounds.accel(self._accel),
            "-smp", str(spec.cpus),
            "-m", str(spec.memory_mb),
            *_memory(spec),
            # a full host pauses the guest (disks.stalled) instead of failing its writes
            "-drive", f"file={self._disk(spec.machine)},format=qcow2,if=none,id=disk0,"
                      f"werror=stop,rerror=stop{self.bounds.disk.drive_options()}",
            "-device", f"virtio-blk-pci,drive=disk0,addr={PCI_DISK}",
            "-drive", f"file={self._seed(spec.machine)},format=raw,if=none,id=seed0,readonly=on",
            "-device", f"virtio-blk-pci,drive=seed0,addr={PCI_SEED}",
            "-fw_cfg", f"name={FW_CFG_METADATA},file={self._metadata(spec.machine)}",
            "-netdev", f"tap,id=net0,ifname={nic.tap},script=no,downscript=no",
            *([] if spec.restore else ["-device", _nic_device(nic.mac)]),
            *display,
            # appended to, so that the oldest output can be dropped under QEMU (consoles.py)
            "-chardev", f"file,id=console0,path={self.console_path(spec.machine)},append=on",
            "-serial", "chardev:console0",
            "-qmp", f"unix:{self._qmp(spec.machine)},server=on,wait=off",
            "-device", f"virtio-serial-pci,addr={PCI_SERIAL}",
            "-chardev", f"socket,id=qga0,path={self._agent(spec.machine)},server=on,wait=off",
            "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-device", f"vmgenid,id=vmgen0{generation}",
            "-pidfile", str(self._pidfile(spec.machine)),
            *(["-incoming", "defer", "-S"] if spec.restore else []),
            *self._confinement(spec),
        ]  # fmt: skip

    def _write_guest_config(self, spec: MachineSpec, mac: str) -> None:
        write_seed(self._seed(spec.machine), spec.guest, mac)
        metadata = json.dumps(dict(spec.guest.metadata), sort_keys=True).encode()
        write_atomically(self._metadata(spec.machine), metadata, 0o600)

    def _confinement(self, spec: MachineSpec) -> list[str]:
        """seccomp, with no program of its own to start (``spawn=deny``),
        and an unprivileged user once QEMU has opened its files, tap and sockets.

        Not the user for a machine that makes a memory template or is restored from one: QEMU
        reopens its disks by path when it saves or loads a machine's state, which the
        unprivileged user cannot do in the owner-only folders (docs/design.md, known limits).
        """
        sandbox = ["-sandbox", "on,obsolete=deny,resourcecontrol=deny,spawn=deny"]
        if self._run_as is None or spec.template is not None:
            return sandbox
        return [*sandbox, "-runas", self._run_as]

    async def start(self, spec: MachineSpec, runtime: Runtime) -> None:
        await asyncio.to_thread(self._write_guest_config, spec, _nic(runtime).mac)
        limit = self.bounds.memory_limit_mb(spec.memory_mb, self._accel)
        argv = [*_scheduling(spec), *self.command_line(spec, runtime)]
        argv = await self.bounds.launch(spec.machine, spec.cpus, limit, argv)
        log = self._log(spec.machine)
        try:
            await launch.launch(argv, log)
        except CommandError as exc:
            raise BootFailed(f"qemu did not start: {exc.stderr_line or exc.message}") from exc
        sockets = [self._qmp(spec.machine), self._agent(spec.machine)]
        await launch.started(self._pidfile(spec.machine), sockets, log, START_TIMEOUT)
        if self._read_pid(spec.machine) is None:
            words = launch.last_words(log) or "it is not running"
            raise BootFailed(f"qemu started, then ended: {words}")
        self._qmp(spec.machine).chmod(0o600)
        self._agent(spec.machine).chmod(0o600)
        if spec.restore:
            assert spec.template is not None
            try:
                await memory.restore(
                    self._qmp(spec.machine), spec.template, _nic_options(_nic(runtime).mac)
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
        await memory.save(self._qmp(machine), NIC_ID, files)
        await processes.wait_exit(pid, KILL_GRACE)
        await asyncio.to_thread(os.replace, self._disk(machine), files.disk)
        await _create_overlay(files.disk, "qcow2", files.overlay)
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
            account = identity.default_account(await _text_of(link, "/etc/passwd"))
            if new_machine:
                # host keys only for a guest with an SSH server: 20 restores at once spent
                # seconds each waiting for RSA keys that the demo guest has no use for
                wanted = bool(await _text_of(link, hostkeys.SSHD_CONFIG))
                keys = await asyncio.to_thread(hostkeys.new_host_keys) if wanted else []
                seed = secrets.token_bytes(SEED_BYTES)
                script = identity.new_machine_script(account, keys, seed, time.time_ns())
                await link.run_script(script, timeout)
            await _set_clock(link)  # checked, and set where the script could not
            for file in identity.files(guest, account):
                await link.write_file(file.path, file.content)
            if (user_data := identity.user_data_script(guest)) is not None:
                await link.start_command(user_data)
        except (TimeoutError, QMPError) as exc:
            raise BootFailed(f"the restored guest could not be given its identity: {exc}") from exc

    def _read_pid(self, machine: str) -> int | None:
        """The pid of this machine's qemu, if it is alive and really is that machine's."""
        try:
            pid = int(self._pidfile(machine).read_text().strip())
        except (OSError, ValueError):
            return None
        argv = processes.argv(pid)
        return pid if argv and _option(argv, "-name") == f"goldclone-{machine}" else None

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
            machine = (_option(argv, "-name") or "").removeprefix("goldclone-")
            if is_vm_id(machine) and _option(argv, "-pidfile") == str(self._pidfile(machine)):
                found.append(_Qemu(int(entry.name), machine, _mac_in(argv)))
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
            link = self._agents[machine] = AgentLink(self._agent(machine))
        return link

    def console_path(self, machine: str) -> Path:
        return self.vm_dir(machine) / "console.log"

    async def adopt(self, runtime: Runtime) -> None:
        await self._networks.adopt(_nic(runtime))
        pid = self._read_pid(runtime.machine)
        argv = processes.argv(pid) if pid is not None else None
        if pid is not None and argv:  # its bounds, as its command line says
            cpus, memory_mb = int(_option(argv, "-smp") or 1), int(_option(argv, "-m") or 0)
            limit = self.bounds.memory_limit_mb(memory_mb, self._accel)
            await self.bounds.adopt(runtime.machine, pid, cpus, limit)

    async def exit_reason(self, machine: str) -> str | None:
        """Why ``machine``'s QEMU ended: the kernel's kill at its memory limit, or how it
        ended and the last thing it said (``qemu.log``)."""
        if (reason := self.bounds.exit_reason(machine)) is not None:
            return reason
        words = await launch.ended(self._log(machine))
        return None if words is None else f"its QEMU ended: {words}"

    def disk_growth(self) -> int:
        return disks.growth_of_all(self._vms_dir)

    async def disk_stalled(self, machine: str) -> bool:
        return await disks.stalled(self._qmp(machine))

    async def resume(self, machine: str) -> None:
        await disks.resume(self._qmp(machine))

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
        qmp = self._qmp(machine)
        steps = [("quit", 3.0)]
        if shutdown_timeout is not None:
            steps.insert(0, ("system_powerdown", shutdown_timeout))
        for command, grace in steps:
            try:
                await qmp_execute(qmp, command, timeout=2.0)
            except QMPError as exc:
                # A monitor that did not take the command (hung, or a stopped process) will
                # not act on it either: waiting out its grace would only delay the next step.
                log.info("VM %s: %s", machine, exc)
                continue
            if await processes.wait_exit(pid, grace):
                return
        log.warning("VM %s: qemu %d did not stop, killing it", machine, pid)
        await processes.end(pid, (signal.SIGKILL,), KILL_GRACE)


async def _create_overlay(base: Path, base_format: str, overlay: Path) -> None:
    try:
        await run(
            "qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", base_format,
            str(overlay),
            timeout=30,
        )  # fmt: skip
    except CommandError as exc:
        raise CloneFailed(f"could not make a disk overlay: {exc.message}") from exc


def _copy_if_present(source: Path, target: Path) -> bool:
    """Copy ``source`` to ``target`` (0600, never half-written); whether there was a
    ``source``."""
    try:
        src = source.open("rb")
    except FileNotFoundError:
        return False
    with src:
        write_atomically(target, lambda out: shutil.copyfileobj(src, out), 0o600)
    return True


class _Qemu(NamedTuple):
    pid: int
    machine: str
    mac: str | None


async def _text_of(link: AgentLink, path: str) -> str:
    """The guest's file ``path``; empty in a guest without one (the demo guest has neither
    ``/etc/passwd`` nor an SSH server)."""
    try:
        return await link.read_file(path)
    except QMPRefused:
        return ""


async def _set_clock(link: AgentLink) -> None:
    """Set the guest's clock to the host's, unless it is right already. qemu-ga sets it, then
    runs ``hwclock -w``, which some images lack (Debian has it in util-linux-extra): that
    error does not count if the clock is right. A guest just restored can be slow to answer,
    and then sets a time that is late by as much: so a slow or failed set is checked, and done
    again if need be."""
    if await _clock_skew(link) <= CLOCK_TOLERANCE_NS:
        return
    trouble = "no answer"
    for _ in range(CLOCK_ATTEMPTS):
        sent = time.time_ns()
        try:
            await link.execute("guest-set-time", {"time": sent}, timeout=CLOCK_TIMEOUT)
            if time.time_ns() - sent <= CLOCK_TOLERANCE_NS:
                return
            trouble = "a slow answer"
        except QMPError as exc:
            trouble = exc.message
        skew = await _clock_skew(link)
        if skew <= CLOCK_TOLERANCE_NS:
            return
        log.debug("guest-set-time: %s; the clock is %d ms off", trouble, skew // 10**6)
    raise QMPError(f"the guest's clock is still {skew / 1e9:.1f} s off ({trouble})")


async def _clock_skew(link: AgentLink) -> int:
    """How far (ns) the guest's clock is from the host's, at least: the guest read it at some
    moment between the ask and the answer, which on a loaded host are far apart."""
    asked = time.time_ns()
    guest = int(await link.execute("guest-get-time"))
    answered = time.time_ns()
    return max(0, asked - guest, guest - answered)


def _memory(spec: MachineSpec) -> list[str]:
    """RAM in the template's file: shared (written) while the template is made, private (copy
    on write, never written back) in a machine restored from it."""
    if spec.template is None:
        return []
    share = "off" if spec.restore else "on"
    backend = (f"memory-backend-file,id=ram0,size={spec.memory_mb}M,"
               f"mem-path={spec.template.ram},share={share}")  # fmt: skip
    return ["-object", backend, "-machine", "pc,memory-backend=ram0"]


def _nic_options(mac: str) -> dict[str, str]:
    """The VM's NIC, as ``device_add`` takes it (``-device`` takes it as ``_nic_device``)."""
    return {"driver": "virtio-net-pci", "netdev": "net0", "id": NIC_ID, "mac": mac,
            "addr": PCI_NIC}  # fmt: skip


def _nic_device(mac: str) -> str:
    options = _nic_options(mac)
    return ",".join([options.pop("driver"), *(f"{k}={v}" for k, v in options.items())])


def _scheduling(spec: MachineSpec) -> list[str]:
    """The commands that run QEMU at ``GUEST_NICE``, and a restored machine, whose work is all
    on its CPU, under ``SCHED_BATCH``; a cold boot, whose firmware polls devices, keeps the
    default policy (docs/design.md, "The QEMU driver", with what was measured)."""
    batch = ["chrt", "--batch", "0"] if spec.restore else []
    return ["nice", "-n", str(GUEST_NICE), *batch]


def _nic(runtime: Runtime) -> Attachment:
    if not isinstance(runtime, Attachment):
        raise TypeError(f"the qemu driver was given another driver's runtime: {runtime!r}")
    return runtime


def _option(argv: list[str], flag: str) -> str | None:
    """The value that follows ``flag`` on command line ``argv``."""
    try:
        return argv[argv.index(flag) + 1]
    except (ValueError, IndexError):
        return None


def _mac_in(argv: list[str]) -> str | None:
    """The MAC of the NIC on qemu command line ``argv``."""
    for arg in argv:
        if arg.startswith("virtio-net-pci,"):
            for option in arg.split(","):
                if option.startswith("mac="):
                    return option.removeprefix("mac=")
    return None
