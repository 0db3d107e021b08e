"""The VMware driver: linked clones through ``vmrun`` on VMware Fusion or Workstation.

Each machine lives in ``vms/<name>/<name>.vmx``, a linked clone of its gold image's template (see
``templates``) made with ``vmrun clone ... linked -snapshot=NAME``. VMware runs its VMs in its
own processes, so guests outlive the service, and a restarted service finds them again in
``vmrun list``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping
from ipaddress import IPv4Address
from pathlib import Path

from goldclone.drivers.base import (
    Capabilities,
    MachineSpec,
    NoChannel,
    Runtime,
    TemplateFiles,
    UnwatchedDisks,
    is_vm_id,
    unless_exited,
)
from goldclone.drivers.vmware import clonevmx, vmnet_leases, vmrun
from goldclone.drivers.vmware.parents import CloneParents
from goldclone.egress import DEFAULT_REACH, Reach
from goldclone.errors import (
    BootFailed,
    CloneFailed,
    CommandError,
    CommandTimeout,
    IPTimeout,
    VMConflict,
)
from goldclone.guest.config import GuestConfig
from goldclone.host.files import write_atomically
from goldclone.images.gold import GoldImage
from goldclone.images.vmx import VmxFile, read_vmx
from goldclone.polling import until
from goldclone.settings import VMwareConfig

log = logging.getLogger(__name__)
_NO_MEMORY_TEMPLATES = (
    "the vmware driver has no memory templates: a linked clone of a snapshot taken while the "
    "template runs could not be checked without a real VMware host, so VMs boot cold"
)

LIST_CACHE = 1.0
"""How long one ``vmrun list`` answers ``is_running`` for every VM."""
_IP_RETRY = 1.0
_LEASE_POLL = 0.5
_HARD_STOP_TIMEOUT = 30.0


class VMwareDriver(UnwatchedDisks, NoChannel):
    name = "vmware"
    capabilities = Capabilities(
        network_types=tuple(clonevmx.CONNECTION_TYPES),
        package_kinds=frozenset({"vmx"}),
    )
    """VMware's own three networks, and VMware VM packages only."""

    def __init__(
        self, data_dir: Path, config: VMwareConfig, shutdown_timeout: float = 10.0
    ) -> None:
        self._vms_dir = data_dir.absolute() / "vms"
        self._templates_dir = data_dir.absolute() / "vmware" / "templates"
        self._config = config
        self._shutdown_timeout = shutdown_timeout
        self._vmrun: vmrun.Vmrun | None = None
        self._parents: CloneParents | None = None
        self._listed: tuple[float, set[str]] | None = None
        self._listing: tuple[float, asyncio.Task[set[str]]] | None = None
        self._changed_at = 0.0
        self._last_known: dict[str, bool] = {}

    async def claim(self) -> None:
        """Nothing to claim (VMware's networks are its own), but a vmrun that is not there is
        said before the server serves."""
        vmrun.locate(self._config.vmrun)

    async def prepare(self) -> None:
        """Find vmrun and check that it works; raises ``DriverUnavailable`` otherwise."""
        path = vmrun.locate(self._config.vmrun)
        runner = vmrun.Vmrun(
            path, vmrun.host_type(self._config.host_type, path), self._config.command_timeout
        )
        await vmrun.check(runner)
        self._vmrun = runner
        self._parents = CloneParents(self._templates_dir, runner, self._config.snapshot_name)
        self._parents.prune()
        log.info("vmware driver: %s -T %s", runner.path, runner.host_type)

    @property
    def cli(self) -> vmrun.Vmrun:
        """The vmrun that ``prepare`` found."""
        if self._vmrun is None:
            raise RuntimeError("the vmware driver is used before prepare()")
        return self._vmrun

    def runtime_from_record(self, machine: str, record: Mapping[str, str]) -> Runtime:
        return Runtime(record.get("machine", machine), record["network_type"], record["mac"])

    def vm_dir(self, machine: str) -> Path:
        return self._vms_dir / machine

    def vmx(self, machine: str) -> Path:
        return self.vm_dir(machine) / f"{machine}.vmx"

    async def clone(
        self,
        machine: str,
        gold: GoldImage,
        template: TemplateFiles | None = None,
        disk_bytes: int | None = None,
    ) -> None:
        """``vmrun clone TEMPLATE.vmx vms/<m>/<m>.vmx linked -snapshot=NAME -cloneName=<m>``,
        then take out of the clone's ``.vmx`` whatever names files outside its folder."""
        assert self._parents is not None
        if template is not None:
            raise CloneFailed(_NO_MEMORY_TEMPLATES)
        if disk_bytes is not None:  # a linked clone's disk has a snapshot: vmrun cannot grow it
            raise CloneFailed("the vmware driver cannot grow a linked clone's disk")
        try:
            source = await self._parents.ensure(gold)
            self._vms_dir.mkdir(parents=True, exist_ok=True)
            await self.cli(
                "clone", str(source), str(self.vmx(machine)), "linked",
                f"-snapshot={self._parents.snapshot}", f"-cloneName={machine}",
            )  # fmt: skip
        except (CommandError, VMConflict) as exc:
            raise CloneFailed(f"vmrun could not make the linked clone: {_reason(exc)}") from exc
        self._edit(machine, clonevmx.confine)

    async def set_reach(self, runtime: Runtime, reach: Reach) -> Runtime:
        return runtime  # without capabilities.walls, nobody asks for another

    async def dropped(self, machine: str | None = None) -> dict[str, int] | None:
        return None

    async def attach(
        self, machine: str, network_type: str, reach: Reach = DEFAULT_REACH
    ) -> Runtime:
        """Give the clone one NIC with a fresh MAC in VMware's static range; vmnet walls
        nothing off (docs/vmware.md), so ``reach`` is only ever the default."""
        mac = clonevmx.fresh_mac(self._macs_in_use())
        self._edit(machine, lambda vmx: clonevmx.set_nic(vmx, network_type, mac))
        return Runtime(machine, network_type, mac)

    async def start(self, spec: MachineSpec, runtime: Runtime) -> None:
        """Set CPUs, memory and name, then ``vmrun start ... nogui`` (``gui`` if not headless,
        or as the configured fallback when vmrun refuses a headless start)."""
        self._edit(spec.machine, lambda vmx: clonevmx.set_machine(vmx, spec))
        vmx = str(self.vmx(spec.machine))
        mode = "nogui" if spec.headless else "gui"
        try:
            await self._power_on(vmx, mode)
            return
        except VMConflict as exc:
            raise BootFailed(f"vmrun could not start the VM: {exc.message}") from exc
        except CommandError as exc:
            if mode == "gui" or not self._config.gui_fallback:
                raise BootFailed(f"vmrun could not start the VM: {_reason(exc)}") from exc
            headless = exc
        if await self._listed_now(vmx):
            log.warning("VM %s: vmrun start nogui failed but the VM runs: %s",
                        spec.machine, _reason(headless))  # fmt: skip
            return
        log.warning("VM %s: vmrun start nogui failed (%s); starting it with a window",
                    spec.machine, _reason(headless))  # fmt: skip
        try:
            await self._power_on(vmx, "gui")
        except (CommandError, VMConflict) as exc:
            raise BootFailed(
                f"vmrun could not start the VM: nogui: {_reason(headless)}; gui: {_reason(exc)}"
            ) from exc

    async def wait_for_ip(self, runtime: Runtime, timeout: float) -> str:
        """The first IP from ``vmrun getGuestIPAddress -wait`` or from vmnet-dhcpd's leases,
        unless the VM stops running first."""
        return await unless_exited(
            self._first_ip(runtime, timeout),
            lambda: self.is_running(runtime.machine),
            "the guest got an IP",
        )

    async def _first_ip(self, runtime: Runtime, timeout: float) -> str:
        sources = {
            asyncio.create_task(self._ip_from_tools(runtime.machine, timeout)),
            asyncio.create_task(self._ip_from_leases(runtime.mac)),
        }
        try:
            done, _ = await asyncio.wait(
                sources, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in sources:
                task.cancel()
            await asyncio.gather(*sources, return_exceptions=True)
        if not done:
            raise IPTimeout(f"the guest got no IP address within {timeout:g} s")
        return done.pop().result()

    async def is_running(self, machine: str) -> bool:
        """Whether ``vmrun list`` names the VM. One listing serves all VMs for a second; when
        vmrun can't list, the last answer stands (a VM is never called stopped on a guess)."""
        vmx = os.path.realpath(self.vmx(machine))
        try:
            running = vmx in await self._running()
        except (CommandError, VMConflict) as exc:
            log.warning("vmrun list failed: %s", exc.message)
            return self._last_known.get(machine, True)
        self._last_known[machine] = running
        return running

    async def settle(self, runtime: Runtime, timeout: float) -> None:
        raise BootFailed(_NO_MEMORY_TEMPLATES)

    async def save_template(self, machine: str, runtime: Runtime, files: TemplateFiles) -> None:
        raise BootFailed(_NO_MEMORY_TEMPLATES)

    async def personalize(
        self, runtime: Runtime, guest: GuestConfig, timeout: float, new_machine: bool = True
    ) -> None:
        raise BootFailed(_NO_MEMORY_TEMPLATES)

    async def agent_ping(self, runtime: Runtime) -> bool:
        """False: VMware Tools is not the QEMU guest agent (``capabilities.guest_agent``)."""
        return False

    def console_path(self, machine: str) -> Path | None:
        """None: a clone's serial ports are unplugged (``clonevmx.confine``)."""
        return None

    async def adopt(self, runtime: Runtime) -> None:
        """Nothing to do: the VM runs in VMware's own process and ``vmrun`` finds it by path."""

    async def destroy(
        self, machine: str, runtime: Runtime | None, *, graceful: bool = True
    ) -> None:
        """Stop soft, then hard; ``vmrun deleteVM``; then remove whatever is left. Raises
        ``VMConflict``, with nothing removed, while VMware holds a lock on the VM."""
        vm_dir, vmx = self.vm_dir(machine), self.vmx(machine)
        if not vm_dir.exists():
            return
        if vmx.exists():
            if await self._listed_now(str(vmx)):
                await self._stop(machine, graceful)
            try:
                await self.cli("deleteVM", str(vmx))
            except CommandError as exc:
                log.warning("VM %s: vmrun deleteVM failed, removing its files: %s", machine, exc)
        await asyncio.to_thread(shutil.rmtree, vm_dir, ignore_errors=True)
        self._last_known.pop(machine, None)
        self._changed()

    async def remove_orphans(self, known_machines: Callable[[], Awaitable[set[str]]]) -> None:
        """Destroy every clone under ``vms/`` that ``known_machines()`` does not name; a
        running VMware VM of ours always has its folder there."""
        found = {entry.name for entry in self._vms_dir.glob("*") if is_vm_id(entry.name)}
        for machine in sorted(found - await known_machines()):
            log.warning("VM %s is not in the store; removing what is left of it", machine)
            await self.destroy(machine, None)

    async def close(self, vms_running: bool) -> None:
        """Nothing to release: VMware's networks and processes are its own."""

    async def health(self) -> dict[str, str | None]:
        """VMware's networks are its own; only vmrun, found at start, is ours to check."""
        return {"vmrun": None if self._vmrun is not None else "vmrun was not found"}

    # -- helpers ------------------------------------------------------------------------------

    def _edit(self, machine: str, change: Callable[[VmxFile], None]) -> None:
        """Apply ``change`` to the clone's ``.vmx``, replacing the file in one step."""
        path = self.vmx(machine)
        try:
            vmx = read_vmx(path)
        except FileNotFoundError:
            raise CloneFailed("vmrun reported a clone, but its .vmx is missing") from None
        change(vmx)
        write_atomically(path, vmx.to_bytes(), 0o600)

    def _macs_in_use(self) -> set[str]:
        """The MACs of every clone, and every MAC with a lease in force."""
        in_use = set(vmnet_leases.read(self._config.lease_files))
        for vmx in self._vms_dir.glob("*/*.vmx"):
            try:
                mac = clonevmx.nic_mac(read_vmx(vmx))
            except OSError:
                continue
            if mac:
                in_use.add(mac)
        return in_use

    async def _power_on(self, vmx: str, mode: str) -> None:
        try:
            await self.cli("start", vmx, mode)
        finally:
            self._changed()

    async def _ip_from_tools(self, machine: str, timeout: float) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                out = await self.cli(
                    "getGuestIPAddress", str(self.vmx(machine)), "-wait",
                    timeout=max(deadline - loop.time(), 0.1),
                )  # fmt: skip
            except CommandTimeout:
                raise IPTimeout(f"the guest got no IP address within {timeout:g} s") from None
            except (CommandError, VMConflict) as exc:
                log.debug("VM %s: getGuestIPAddress: %s", machine, exc)
            else:
                if ip := _guest_ipv4(out):
                    return ip
            await asyncio.sleep(_IP_RETRY)

    async def _ip_from_leases(self, mac: str) -> str:
        return await until(
            lambda: vmnet_leases.lookup(self._config.lease_files, mac), interval=_LEASE_POLL
        )

    async def _stop(self, machine: str, graceful: bool) -> None:
        vmx = str(self.vmx(machine))
        if graceful:
            try:
                await self.cli("stop", vmx, "soft", timeout=self._shutdown_timeout)
                return
            except CommandError as exc:
                log.info("VM %s: soft stop failed, stopping it hard: %s", machine, exc.message)
            finally:
                self._changed()
        try:
            await self.cli("stop", vmx, "hard", timeout=_HARD_STOP_TIMEOUT)
        except CommandError as exc:
            if await self._listed_now(vmx):
                raise
            log.info("VM %s: stopped after all: %s", machine, exc.message)
        finally:
            self._changed()

    async def _running(self) -> set[str]:
        """The running VMs' ``.vmx`` paths; one ``vmrun list`` at a time serves every caller,
        and its answer serves for a second unless a VM was started or stopped since."""
        if self._listed is not None:
            listed_at, paths = self._listed
            if listed_at > self._changed_at and time.monotonic() - listed_at <= LIST_CACHE:
                return paths
        if self._listing is None or self._listing[0] <= self._changed_at:
            started = time.monotonic()
            task = asyncio.create_task(self.cli.running())
            task.add_done_callback(lambda done: self._list_done(started, done))
            self._listing = (started, task)
        return await asyncio.shield(self._listing[1])

    def _list_done(self, started: float, task: asyncio.Task[set[str]]) -> None:
        if self._listing is not None and self._listing[1] is task:
            self._listing = None
        if not task.cancelled() and task.exception() is None:
            self._listed = (started, task.result())

    async def _listed_now(self, vmx: str) -> bool:
        """Whether ``vmrun list`` names ``vmx`` right now, without the cache."""
        self._changed()
        return os.path.realpath(vmx) in await self._running()

    def _changed(self) -> None:
        """Forget the cached listing: a VM may have started or stopped."""
        self._changed_at = time.monotonic()


def _guest_ipv4(out: str) -> str | None:
    for word in out.split():
        try:
            ip = IPv4Address(word)
        except ValueError:
            continue
        if not (ip.is_unspecified or ip.is_link_local or ip.is_loopback):
            return str(ip)
    return None


def _reason(exc: CommandError | VMConflict) -> str:
    if isinstance(exc, CommandError):
        return exc.stderr_line or exc.message
    return exc.message
