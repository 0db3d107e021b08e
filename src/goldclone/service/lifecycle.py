"""The life of one VM: fetch its image, clone, attach, boot, find the IP, report; and destroy.

Each create runs as an asyncio task. Every change of state goes through the store's state
machine before the service acts on it, so that a restarted service knows what each VM was
doing, and an actor that lost a race learns it from a ``StateConflict``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from goldclone.drivers.base import (
    Driver,
    MachineSpec,
    PackageKind,
    Runtime,
    TemplateFiles,
    package_kind,
)
from goldclone.egress import DEFAULT_REACH, Reach, reach_of
from goldclone.errors import (
    GoldcloneError,
    ImageUnsupported,
    StateConflict,
    VMConflict,
    VMFailure,
    VMNotFound,
)
from goldclone.guest.config import GuestConfig
from goldclone.host.tails import read_end
from goldclone.images.cache import ImageCache
from goldclone.images.gold import GoldImage
from goldclone.models import VM, CreateVMRequest, ErrorBody, Phase, Status
from goldclone.service import console
from goldclone.service.deliveries import Deliveries
from goldclone.service.image_access import ImageAccess
from goldclone.service.machines import PERSONALIZE_TIMEOUT, bring_up
from goldclone.service.readiness import wait_ready
from goldclone.service.sizing import fit_disk
from goldclone.service.templates import Templates
from goldclone.settings import Settings
from goldclone.shape import Shape
from goldclone.store import handoff_records, leftover_records, vm_records
from goldclone.store.database import Database
from goldclone.store.leftover_records import Leftover
from goldclone.store.vm_records import LIVE

log = logging.getLogger(__name__)

STOPPED_REASON = "its hypervisor process ended: the guest powered off, or the process exited"
CONSOLE_KEPT = 64 * 1024
STORE_WAIT = 120.0
"""Seconds that a create in flight waits for an unavailable store before it gives up (its VM
then stays ``creating`` until a restart finishes it)."""
"""Bytes of the end of a failed VM's console kept in the store, after its folder is gone."""

_PACKAGE_KINDS: dict[PackageKind, str] = {
    "disk": "a bare disk image",
    "vmx": "a VMware VM package (a .vmx with its disks)",
}


class Lifecycle:
    """Creates and destroys the VMs of this host, one task per create."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        images: ImageCache,
        driver: Driver,
        templates: Templates,
        deliveries: Deliveries,
        access: ImageAccess,
        on_powered_off: Callable[[str], Coroutine[Any, Any, None]],
    ) -> None:
        """``on_powered_off`` is given the ID of each VM of ``on_poweroff: delete`` whose guest
        powered itself off, to delete it."""
        self._settings = settings
        self._on_powered_off = on_powered_off
        self._deliveries = deliveries
        self._templates = templates
        self._db = db
        self._images = images
        self._access = access
        self._driver = driver
        self._creating: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._machines: dict[str, str] = {}
        self._taking = asyncio.Lock()

    def begin(self, vm: VM, guest: GuestConfig) -> asyncio.Task[None]:
        """Start creating ``vm``, which the store holds as ``creating``, in the background,
        with ``guest`` for its guest; the task that does it."""
        task = asyncio.create_task(self._build(vm, guest), name=f"create {vm.id}")
        self._creating[vm.id] = task
        task.add_done_callback(lambda _: self._creating.pop(vm.id, None))
        return task

    async def take_handoffs(self) -> list[tuple[VM, asyncio.Task[None]]]:
        """Begin the creates that other hosts placed on this one (``Admission.record``), as if
        this host had received them; each VM with the task that creates it."""
        async with self._taking:
            begun = []
            for vm, request in await self._take_handoffs():
                guest = GuestConfig.of(vm.id, CreateVMRequest.model_validate_json(request))
                log.info("VM %s: placed on this host; creating it", vm.id)
                begun.append((vm, self.begin(vm, guest)))
            return begun

    async def creating(self, vm_id: str) -> bool:
        """Whether the VM is being created here, counting a create handed over to this host
        and not taken yet (it is taken now)."""
        if vm_id not in self._creating:
            await self.take_handoffs()
        return vm_id in self._creating

    async def close(self) -> None:
        """Cut off the creates under way and the background work; the creates are finished
        as ``interrupted`` at the next start."""
        tasks = [*self._creating.values(), *self._background]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def delete(self, vm_id: str, expired: bool = False, tell: bool = False) -> None:
        """Cancel the VM's creation if it is under way, then destroy it and forget it. A VM
        whose lease ended (``expired``) gets the phase ``expired`` instead of ``deleting``,
        and its callback is told, as with ``tell``; one already being deleted is left to
        that.

        When the hypervisor refuses with ``VMConflict`` (it holds a lock), the VM stays
        recorded, as it was unless its creation was cut off, and a retry can finish the job.
        Any other trouble of the teardown does not keep the VM: it is forgotten, and what
        could not be removed is retried by reconciliation.
        """
        async with self.lock(vm_id):
            before = await self.get(vm_id)
            if (task := await self._cut_off(vm_id)) is not None:
                before = await self.get(vm_id)
            if expired:
                vm = await self.advance(vm_id, Phase.EXPIRED, LIVE, Status.DELETING)
            else:
                vm = await self.advance(vm_id, Phase.DELETING, tuple(Status), Status.DELETING)
            if expired or tell:
                await self.report(vm)
            try:
                await self.remove(vm_id, graceful=before.status is Status.RUNNING)
            except VMConflict:
                if task is None:
                    await self._db.write(lambda conn: vm_records.put_back(conn, before))
                raise

    async def _cut_off(self, vm_id: str) -> asyncio.Task[None] | None:
        """Cancel the VM's create task if one is under way here, and return it once it has
        ended."""
        task = self._creating.get(vm_id)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return task

    async def finish_delete(self, vm_id: str) -> None:
        """Destroy a VM that was left ``deleting``: by a service that stopped, a hypervisor
        that refused, or another host that asked for it; a create of it still under way here
        is cut off first. Call it holding ``lock(vm_id)``."""
        cut_off = await self._cut_off(vm_id) is not None
        vm = await self.get(vm_id)
        if vm.status is Status.DELETING:
            await self.remove(vm_id, graceful=not cut_off and vm.ip_address != "")

    async def remove(self, vm_id: str, graceful: bool = True) -> None:
        """Tear down a ``deleting`` VM and forget it, with whatever its teardown could not
        remove kept for reconciliation. Raises ``VMConflict`` when the hypervisor refuses.
        A guest is asked to power off only if ``graceful``: one still booting would not."""
        leftover = await self._remove_machine_or_leftover(vm_id, graceful=graceful)
        await self.forget(vm_id, leftover)
        self._locks.pop(vm_id, None)
        self._machines.pop(vm_id, None)
        log.info("VM %s destroyed%s", vm_id, " (with a cleanup left to retry)" if leftover else "")

    async def forget(self, vm_id: str, leftover: Leftover | None = None) -> None:
        """Remove the record of a ``deleting`` VM whose machine is gone, with ``leftover``,
        what its teardown could not remove, recorded in the same transaction for
        reconciliation to retry."""
        host_id = self._db.host_id

        async def forget(conn: AsyncConnection) -> None:
            await vm_records.remove(conn, vm_id)
            await handoff_records.drop(conn, vm_id)
            if leftover is not None:
                await leftover_records.add(conn, host_id, leftover)

        await self._db.write(forget)

    async def _remove_machine_or_leftover(
        self, vm_id: str, refused_too: bool = False, graceful: bool = False
    ) -> Leftover | None:
        """``remove_machine``, but trouble becomes the ``Leftover`` that reconciliation retries
        rather than an error; a hypervisor's refusal (``VMConflict``) too if ``refused_too``."""
        try:
            await self.remove_machine(vm_id, graceful)
        except VMConflict:
            if not refused_too:
                raise
            return await self._leftover(vm_id, "the hypervisor refused to remove it")
        except Exception as exc:
            return await self._leftover(
                vm_id, str(exc) if isinstance(exc, GoldcloneError) else repr(exc)
            )
        return None

    async def _leftover(self, vm_id: str, reason: str) -> Leftover:
        log.warning("VM %s: its teardown failed (%s); reconciliation tries again", vm_id, reason)
        runtime = await self.runtime(vm_id)
        if runtime is None:
            return Leftover(vm_id, vm_id, {}, reason)
        return Leftover(vm_id, runtime.machine, runtime.record(), reason)

    async def refresh(self, vm: VM) -> VM:
        """``vm``, marked ``stopped`` if its hypervisor process has ended, with the reason."""
        machine = await self.machine(vm.id)
        if vm.status is not Status.RUNNING or await self._driver.is_running(machine):
            return vm
        reason = await self._driver.exit_reason(machine) or STOPPED_REASON
        try:
            vm = await self.advance(
                vm.id, Phase.STOPPED, Status.RUNNING, Status.STOPPED, status_reason=reason
            )
        except StateConflict:
            return await self.get(vm.id)  # it changed meanwhile: that state stands
        if vm.on_poweroff == "delete" and await self._driver.powered_off(machine):
            self.spawn(self._on_powered_off(vm.id))
        return vm

    async def fail(self, vm: VM, exc: Exception) -> VM:
        """Remove everything of ``vm``, a create that failed with ``exc``, and record it in
        ``error``."""
        if isinstance(exc, VMFailure):
            error = ErrorBody(code=exc.code, message=self._public(exc.message))
            log.warning("VM %s failed: %s: %s", vm.id, exc.code, exc.message)
        else:
            log.error("VM %s failed unexpectedly", vm.id, exc_info=exc)
            error = ErrorBody(
                code="internal-error", message="an internal error; see the server log"
            )
        console = await self._console_end(vm.id)  # before the teardown removes it
        if (
            leftover := await self._remove_machine_or_leftover(vm.id, refused_too=True)
        ) is not None:
            host_id = self._db.host_id
            add = partial(leftover_records.add, host_id=host_id, leftover=leftover)
            await self._db.write(add, STORE_WAIT)

        async def failed(conn: AsyncConnection) -> VM:
            changed = await vm_records.change(
                conn, vm.id, Status.CREATING, Phase.ERROR, Status.ERROR, error=error
            )
            if console:
                await vm_records.keep_console(conn, vm.id, console)
            return changed

        return await self._db.write(failed, STORE_WAIT)

    async def _console_end(self, vm_id: str) -> str | None:
        """The last ``CONSOLE_KEPT`` bytes of the VM's console, as text, if it has one."""
        path = self._driver.console_path(await self.machine(vm_id))
        if path is None:
            return None
        end = await asyncio.to_thread(read_end, path, CONSOLE_KEPT)
        return None if end is None else console.printable(end.decode(errors="replace"))

    async def remove_machine(self, vm_id: str, graceful: bool = False) -> None:
        """Remove every part of the VM's machine: process, clone, NIC and lease. Safe to
        repeat. The guest is asked to power off first only if ``graceful``."""
        runtime = await self.runtime(vm_id)
        machine = runtime.machine if runtime is not None else vm_id
        await self._driver.destroy(machine, runtime, graceful=graceful)

    async def runtime(self, vm_id: str) -> Runtime | None:
        """The driver's runtime of the VM's machine, once recorded."""
        record = await self._db.read(lambda conn: vm_records.runtime(conn, vm_id))
        return self._driver.runtime_from_record(vm_id, record) if record else None

    async def mine(self) -> list[VM]:
        """This host's VMs, in the order they were accepted."""
        host_id = self._db.host_id
        return await self._db.read(lambda conn: vm_records.of_host(conn, host_id))

    async def get(self, vm_id: str) -> VM:
        return await self._db.read(lambda conn: vm_records.get(conn, vm_id))

    async def advance(
        self,
        vm_id: str,
        phase: Phase,
        expect: Status | tuple[Status, ...],
        status: Status | None = None,
        wait: float = 0.0,
        **fields: Any,
    ) -> VM:
        """The VM, moved on to ``phase`` as ``vm_records.change`` says, in a transaction of its
        own (waiting up to ``wait`` seconds for a store that is unavailable)."""
        return await self._db.write(
            lambda conn: vm_records.change(conn, vm_id, expect, phase, status, **fields), wait
        )

    async def amend(self, vm_id: str, expect: Status | tuple[Status, ...], **fields: Any) -> VM:
        """The VM with ``fields`` changed (its labels, lease, status reason), in no new phase."""
        return await self._db.write(
            lambda conn: vm_records.change(conn, vm_id, expect, None, None, **fields)
        )

    async def _set_runtime(self, vm_id: str, runtime: Runtime) -> None:
        record = runtime.record()
        await self._db.write(lambda conn: vm_records.set_runtime(conn, vm_id, record), STORE_WAIT)

    async def _take_handoffs(self) -> list[tuple[VM, str]]:
        """The VMs that other hosts placed on this one, with their requests (JSON), taken:
        each is returned once (only this host takes its own, one call at a time). Looking
        writes nothing, and taking wakes no one: it runs at every change."""
        host_id = self._db.host_id
        waiting = await self._db.read(lambda conn: handoff_records.waiting(conn, host_id))
        if not waiting:
            return []
        taken = [vm_id for vm_id, _ in waiting]
        found = await self._db.write(lambda conn: handoff_records.take(conn, taken))
        return [(found[vm_id], request) for vm_id, request in waiting if vm_id in found]

    async def report(self, vm: VM) -> None:
        """Have the VM's callback delivered, as the VM is now (``service.deliveries``)."""
        await self._deliveries.send(vm)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` in the background until it ends or the service closes."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def lock(self, vm_id: str) -> asyncio.Lock:
        """Held while the VM is destroyed, so that work on it is done once."""
        return self._locks.setdefault(vm_id, asyncio.Lock())

    async def machine(self, vm_id: str) -> str:
        """The name of the VM's machine (``VMNotFound`` for an unknown VM); remembered,
        since every GET of a running VM asks."""
        if (machine := self._machines.get(vm_id)) is None:
            runtime = await self.runtime(vm_id)
            if runtime is None:
                return vm_id
            machine = self._machines[vm_id] = runtime.machine
        return machine

    async def _build(self, vm: VM, guest: GuestConfig) -> None:
        try:
            vm = await self._boot(vm, guest)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            try:
                vm = await self.fail(vm, exc)
            except (VMNotFound, StateConflict) as lost:
                log.info("VM %s failed (%s), but %s", vm.id, exc, lost)
                return
        await self.report(vm)

    async def _boot(self, vm: VM, guest: GuestConfig) -> VM:
        if vm.started_from == "pool":
            return await self._claim(vm, guest)

        fetched = False

        async def fetching() -> None:
            nonlocal fetched
            fetched = True
            await self._step(vm, Phase.DOWNLOADING)

        self._access.asked(vm.image, vm.tenant)
        gold = await self._images.ensure(vm.image, on_fetch=fetching)
        await self._access.shown(vm.image, vm.tenant)
        await self._step(vm, Phase.CLONING, image_from_cache=not fetched)
        async with self._images.lock(gold.key):
            if not gold.root.exists():  # deleted since: fetch it again
                gold = await self._images.ensure(vm.image, on_fetch=fetching)
                await self._access.shown(vm.image, vm.tenant)
            self._check_package(gold)
            disk_bytes = await fit_disk(gold, Shape.of(vm))
            template = await self._template_for(vm, gold, guest)
            await self._driver.clone(vm.id, gold, template, disk_bytes)
        restore = template is not None

        async def attached(runtime: Runtime) -> None:
            await self._set_runtime(vm.id, runtime)
            await self._step(vm, Phase.RESTORING if restore else Phase.BOOTING,
                             mac_address=runtime.mac,
                             started_from="template" if restore else "cold")  # fmt: skip

        spec = MachineSpec(vm.id, vm.cpus, vm.memory, vm.headless, guest, template, restore)
        runtime, ip = await bring_up(self._driver, spec, vm.network_type, attached,
                                     self._settings.ip_timeout, _reach(vm))  # fmt: skip
        vm = await self._running(vm, runtime, ip)
        if not restore and vm.start == "auto" and not guest.needs_first_boot:
            await self._templates.booted_cold(gold.key, Shape.of(vm))
        return vm

    async def _claim(self, vm: VM, guest: GuestConfig) -> VM:
        """Give the machine that ``vm`` claimed from a warm pool (at admission) the request's
        identity; it has run since the pool restored it, so it has its IP already."""
        runtime = await self.runtime(vm.id)
        assert runtime is not None  # the pooled machine's, recorded with the claim
        if (reach := _reach(vm)) != DEFAULT_REACH:  # its pool kept it with the default
            runtime = await self._driver.set_reach(runtime, reach)
            await self._set_runtime(vm.id, runtime)
        await self._step(vm, Phase.CLAIMED, mac_address=runtime.mac, image_from_cache=True)
        await self._driver.personalize(runtime, guest, PERSONALIZE_TIMEOUT, new_machine=False)
        ip = await self._driver.wait_for_ip(runtime, self._settings.ip_timeout)
        return await self._running(vm, runtime, ip)

    async def _running(self, vm: VM, runtime: Runtime, ip: str) -> VM:
        """``vm``, whose machine is up at ``ip``, once it passes its ``ready_when``."""
        if vm.ready_when is not None:
            timeout = vm.ready_when.timeout or self._settings.ready_timeout
            await wait_ready(ip, vm.ready_when, timeout, lambda: self._driver.agent_ping(runtime))
            await self._step(vm, Phase.READY)
        vm = await self._step(vm, Phase.RUNNING, status=Status.RUNNING, ip_address=ip)
        return vm

    async def _template_for(
        self, vm: VM, gold: GoldImage, guest: GuestConfig
    ) -> TemplateFiles | None:
        """The ready template of ``gold`` to restore ``vm`` from, if it may start from one:
        not when cold is asked for, nor for ``#cloud-config`` user data, which needs a first
        boot."""
        if vm.start == "cold" or guest.needs_first_boot:
            return None
        return await self._templates.ready(gold.key, Shape.of(vm))

    def _check_package(self, gold: GoldImage) -> None:
        kind, taken = package_kind(gold), self._driver.capabilities.package_kinds
        if kind not in taken:
            wanted = " or ".join(_PACKAGE_KINDS[k] for k in sorted(taken))
            raise ImageUnsupported(
                f"the {self._driver.name} driver needs {wanted}; this image is "
                f"{_PACKAGE_KINDS[kind]}"
            )

    async def _step(self, vm: VM, phase: Phase, **changes: Any) -> VM:
        return await self.advance(vm.id, phase, Status.CREATING, wait=STORE_WAIT, **changes)

    def _public(self, message: str) -> str:
        """``message`` without the host's data dir path in it."""
        return message.replace(str(Path(self._settings.data_dir).absolute()), "$DATA_DIR")


def _reach(vm: VM) -> Reach:
    return reach_of(vm.tenant, vm.network_group, vm.egress)
