"""``VMService``: what the API calls. It owns this host's VMs and gold images, starts and stops
every part of the service, and hands each VM operation to the part that does it (admission,
the lifecycle of one VM, recovery). The API calls its methods and, for what is not a VM's,
the parts it exposes: ``catalog`` (images), ``templates``, ``pools``, ``fleet`` (hosts),
``leases`` and ``metrics``; the others are its own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx

from goldclone.access import DEFAULT_TENANT
from goldclone.drivers.base import Driver
from goldclone.errors import (
    ConsoleUnavailable,
    ExecUnavailable,
    StateConflict,
    VMAmbiguous,
    VMConflict,
    VMNotFound,
)
from goldclone.guest.channel import Channel
from goldclone.host.datadir import DataDirLock
from goldclone.images.cache import ImageCache
from goldclone.images.oci.pull import Puller
from goldclone.images.oci.registry import open_registry
from goldclone.images.unpack import UnpackLimits
from goldclone.models import (
    VM,
    Check,
    CreateVMRequest,
    Image,
    ImageBuild,
    ImageStatus,
    Phase,
    Readiness,
    Status,
    UpdateVMRequest,
)
from goldclone.outbound.policy import OutboundPolicy
from goldclone.service import console, events, journal
from goldclone.service.admission import Admission
from goldclone.service.building import Builder
from goldclone.service.catalog import Catalog
from goldclone.service.channels import Channels
from goldclone.service.deliveries import Deliveries
from goldclone.service.events import VMFilter
from goldclone.service.fleet import Fleet
from goldclone.service.image_access import ImageAccess
from goldclone.service.leases import LeasePolicy, Sweeper
from goldclone.service.lifecycle import Lifecycle
from goldclone.service.metrics import Metrics
from goldclone.service.pinning import Pinning
from goldclone.service.pools import Pools
from goldclone.service.recovery import Recovery
from goldclone.service.sizing import fit_cached_disk
from goldclone.service.templates import Templates
from goldclone.service.watches import Watches
from goldclone.settings import Settings
from goldclone.store import event_log, host_records, vm_records
from goldclone.store.checksum_records import Checksums
from goldclone.store.database import Database
from goldclone.store.event_log import Event, EventKind
from goldclone.store.listener import ChangeListener
from goldclone.store.vm_records import LIVE

log = logging.getLogger(__name__)


class VMService:
    """Every VM and gold image of this host."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        driver: Driver,
        http: httpx.AsyncClient,
        metrics: Metrics,
    ) -> None:
        self._lock = DataDirLock(settings.data_dir)
        policy = OutboundPolicy(allow_private=settings.allow_private_urls)
        self._registry = open_registry(settings, policy)
        puller = Puller(self._registry, settings.data_dir.absolute() / "downloads", UnpackLimits())
        images = ImageCache(settings.data_dir, http, settings.download_timeout,
                            reserve_bytes=settings.reserve_mb << 20, checksums=Checksums(db),
                            growth=driver.disk_growth, on_change=self._image_changed,
                            puller=puller)  # fmt: skip
        self._db = db
        self._images = images
        self._driver = driver
        self._http = http
        self.leases = LeasePolicy.of(settings)
        self._admission = Admission(
            settings.limits, driver.capabilities, db, policy, self.leases,
            settings.placement, settings.host_lost_after, settings.network.egress,
        )  # fmt: skip
        self.templates = Templates(settings, db, images, driver, self._admission)
        self.pools = Pools(settings, db, images, driver, self._admission, self.templates)
        self.pinning = Pinning(self._registry, self.pools.images)
        self.pools.pinning = self.pinning
        self.metrics = metrics
        self._deliveries = Deliveries(db, http, settings.callback_schedule,
                                      settings.callback_secret, self.metrics.delivered)  # fmt: skip
        self._image_access = ImageAccess(db, images)
        self._lifecycle = Lifecycle(
            settings, db, images, driver, self.templates, self._deliveries, self._image_access,
            self._powered_off,
        )  # fmt: skip
        watches = Watches(settings, driver, self._lifecycle)
        self._recovery = Recovery(db, driver, self._lifecycle, settings.reconcile_interval,
                                  watches)  # fmt: skip
        self.catalog = Catalog(db, images, self._admission, self.templates, self.pools,
                               self._image_access, self.pinning,
                               settings.image_cache_bytes)  # fmt: skip
        self.builder = Builder(self._lifecycle, driver, images, self._registry,
                               self._image_access, self.catalog)  # fmt: skip
        self._sweeper = Sweeper(db, self.expire)
        self.fleet = Fleet(settings, db, driver.name, self._admission.bounds, self.catalog.held)
        self._listener = ChangeListener(settings.db_url, db.changes) if db.shared else None
        self.channels = Channels(driver)
        self._parts = contextlib.AsyncExitStack()

    async def claim(self) -> None:
        """Take the data dir for this service (or raise ``DataDirInUse``), and check that the
        driver's shared host parts are not another's (or raise ``DriverUnavailable``).
        ``start`` does it too; a server calls it first, so that it can say why it does not
        start before it serves anything."""
        self._lock.acquire()
        try:
            await self._driver.claim()
        except BaseException:
            self._lock.release()
            raise

    async def start(self) -> None:
        """Take the data dir, bring the store to this code's schema, check the hypervisor, and
        recover what a stopped service left. Each part that starts joins the stack that
        ``close`` unwinds; a start that fails unwinds it at once, so it leaves nothing
        running and the data dir free."""
        await self.claim()
        async with contextlib.AsyncExitStack() as parts:
            parts.callback(self._lock.release)
            parts.push_async_callback(self._http.aclose)
            parts.push_async_callback(self._registry.aclose)
            parts.push_async_callback(self._db.close)
            parts.push_async_callback(self._close_driver)
            await self._db.open()
            await self._db.write(lambda conn: host_records.adopt_unowned(conn, self._db.host_id))
            if self._listener is not None:
                await self._listener.start()
                parts.push_async_callback(self._listener.close)
            await self.fleet.start()
            parts.push_async_callback(self.fleet.close)
            await self._driver.prepare()
            parts.push_async_callback(self._images.close)
            await self._images.open()
            parts.push_async_callback(self.templates.close)
            await self.templates.recover()
            parts.push_async_callback(self._lifecycle.close)
            parts.push_async_callback(self.channels.close)
            self._lifecycle.spawn(self._db.changes.follow(
                self._take_handoffs, "taking the creates placed on this host",
                event_log.host_subject(self._db.host_id),
            ))  # fmt: skip
            await self._recovery.start()
            parts.push_async_callback(self._deliveries.close)
            self._deliveries.start()
            parts.push_async_callback(self._sweeper.close)
            await self._sweeper.start()
            parts.push_async_callback(self.pools.close)
            await self.pools.start()
            await self.catalog.trim()
            self._parts = parts.pop_all()

    async def close(self) -> None:
        """Stop background work, each part in the reverse order of its start. Running VMs
        keep running, with their networks; unfinished creates are cut off and finished as
        ``interrupted`` at the next start. With no VM running, the networks are removed too,
        so a stopped service leaves nothing behind."""
        await self._parts.aclose()

    async def _close_driver(self) -> None:
        """Close the driver, with its networks unless a machine of this host still runs (or
        the store cannot say: what runs was there before)."""
        host_id = self._db.host_id
        try:
            machines = await self._db.read(lambda conn: host_records.machines(conn, host_id))
            vms = await self._db.read(lambda conn: vm_records.machines(conn, host_id))
            running = {m for m in machines if await self._driver.is_running(m)}
        except Exception:
            log.warning("the store cannot say which machines run; the networks are kept")
            await self._driver.close(vms_running=True)
            return
        if running:
            log.info(
                "%d VM(s) and %d warm pool or template machine(s) of this host keep running, "
                "and the next start adopts them; to remove them, delete the VMs "
                "(`goldclone list`, `goldclone delete ID...`) and pools (DELETE /pools/NAME) "
                "before stopping",
                len(running & vms), len(running - vms),
            )  # fmt: skip
        await self._driver.close(vms_running=bool(running))

    async def create(
        self,
        request: CreateVMRequest,
        idempotency_key: str | None = None,
        tenant: str = DEFAULT_TENANT,
    ) -> VM:
        """Accept a VM of ``tenant`` and start creating it in the background; see
        ``Admission.admit``."""
        self._admission.check_image("image", request.image)
        asked = request
        image = await self.pinning.pin(request.image, "image")
        request = request.model_copy(update={"image": image})
        await fit_cached_disk(self._images, request)
        await self._image_access.check_named(request.image, tenant)
        # a pooled machine only for a URL shown to give its image: it is checked otherwise
        pools = self.pools.matching(request)
        if pools and not await self._image_access.may_claim(request.image, tenant):
            pools = []
        vm, guest = await self._admission.admit(request, idempotency_key, pools, tenant, asked)
        if guest is not None:
            journal.accepted(vm)
            if self.fleet.is_mine(vm):
                self._begun(vm, self._lifecycle.begin(vm, guest))
        return self._with_progress(vm)

    def _begun(self, vm: VM, task: asyncio.Task[None]) -> None:
        if (pool := vm.pool) is not None:  # refilled once the claim is done: not during it
            task.add_done_callback(lambda _: self.pools.wake(pool))

    async def _take_handoffs(self) -> None:
        """Begin the creates that other hosts placed on this one."""
        for vm, task in await self._lifecycle.take_handoffs():
            self._begun(vm, task)

    async def resolve(self, ref: str, tenant: str | None = None) -> str:
        """The ID of the VM of ``tenant`` (any tenant's, with ``None``) that ``ref`` names: its
        ID in any spelling, its name, or the start of its ID; see ``vm_records.matching``.
        Raises ``VMNotFound``, or ``VMAmbiguous`` naming the VMs that ``ref`` could mean."""
        with contextlib.suppress(ValueError):
            ref = str(uuid.UUID(ref))
        found = await self._db.read(lambda conn: vm_records.matching(conn, ref, tenant))
        if not found:
            raise VMNotFound(vm=ref)
        if len(found) > 1:
            shown = [f"{vm_id} ({name})" if name else vm_id for vm_id, name in found]
            more = ", and more" if len(shown) > vm_records.MATCHES_SHOWN else ""
            raise VMAmbiguous(
                f"{ref!r} names several VMs: {', '.join(shown[: vm_records.MATCHES_SHOWN])}"
                f"{more}; give more of the ID"
            )
        return found[0][0]

    async def get(self, vm_id: str, wait: float = 0.0, tenant: str | None = None) -> VM:
        """The VM that ``vm_id`` names (``resolve``) if it is ``tenant``'s (with ``None``, any
        tenant's); with ``wait``, once it is no longer ``creating`` or after ``wait``
        seconds, whichever comes first."""
        vm_id = await self.resolve(vm_id, tenant)
        deadline = asyncio.get_running_loop().time() + wait
        with self._db.changes.watching(vm_id) as change:
            while True:
                vm = await self._as_known(await self._own(vm_id, tenant))
                left = deadline - asyncio.get_running_loop().time()
                if vm.status is not Status.CREATING or left <= 0:
                    return await self._with_drops(vm)
                await change.wait(left)

    async def _with_drops(self, vm: VM) -> VM:
        """``vm`` with what its network's rules dropped, if it runs here."""
        if vm.status is not Status.RUNNING or not self.fleet.is_mine(vm):
            return vm
        dropped = await self._driver.dropped(await self._lifecycle.machine(vm.id))
        return vm.model_copy(update={"dropped_packets": dropped})

    async def list_vms(self, wanted: VMFilter | None = None) -> list[VM]:
        """Every VM, or those that ``wanted`` matches."""
        vms = []
        every = await self._db.read(lambda conn: vm_records.of_host(conn, None))
        for vm in await self.fleet.seen(every):
            with contextlib.suppress(VMNotFound):  # deleted since the list was read
                vm = await self._fresh(vm)
                if wanted is None or wanted.matches(vm):
                    vms.append(vm)
        return vms

    async def _as_known(self, vm: VM) -> VM:
        """``vm`` as it is now: ``stopped`` if its guest here is gone, ``unknown`` if its host
        is lost, with its download's progress."""
        [vm] = await self.fleet.seen([vm])
        return await self._fresh(vm)

    async def _fresh(self, vm: VM) -> VM:
        if self.fleet.is_mine(vm):
            vm = await self._lifecycle.refresh(vm)
        return self._with_progress(vm)

    async def update(self, vm_id: str, change: UpdateVMRequest, tenant: str | None = None) -> VM:
        """Renew the VM's lease, change its labels, or both, if it is ``tenant``'s; 409 once it
        is being deleted."""
        vm_id = await self.resolve(vm_id, tenant)
        fields: dict[str, Any] = {}
        if "ttl" in change.model_fields_set:
            fields["expires_at"] = self.leases.expiry(change.ttl, given=True)
        if change.labels is not None:
            fields["labels"] = change.labels
        await self.fleet.refuse_if_lost(await self._own(vm_id, tenant))
        try:
            vm = await self._lifecycle.amend(vm_id, LIVE, **fields)
        except StateConflict:
            raise VMConflict(
                f"VM {vm_id} is being deleted; it can no longer be changed", vm=vm_id
            ) from None
        return self._with_progress(vm)

    async def delete(self, vm_id: str, tenant: str | None = None) -> None:
        """Destroy the VM, if it is ``tenant``'s, here, or have its host do it
        (``Fleet.delete_elsewhere``); a VM whose host was forgotten has nothing left to
        destroy, and its record goes."""
        vm = await self._own(await self.resolve(vm_id, tenant), tenant)
        if self.fleet.is_mine(vm):
            await self._lifecycle.delete(vm.id)
            self._freed()
        elif await self.fleet.forgotten(vm):
            await self._lifecycle.advance(vm.id, Phase.DELETING, tuple(Status), Status.DELETING)
            await self._lifecycle.forget(vm.id)
        else:
            await self.fleet.delete_elsewhere(vm)

    async def _own(self, vm_id: str, tenant: str | None) -> VM:
        """The VM of ID ``vm_id``, if it is ``tenant``'s (any tenant's, with ``None``): another
        tenant's is not found, so that its ID tells nothing."""
        vm = await self._lifecycle.get(vm_id)
        if tenant is not None and vm.tenant != tenant:
            raise VMNotFound(vm=vm_id)
        return vm

    def _freed(self) -> None:
        """A VM is gone: the room it held may be what a pool waits for, and its image may be
        what the cache budget can give up now."""
        self.pools.wake()
        self._lifecycle.spawn(self.catalog.trim())

    async def forget_host(self, host_id: str) -> None:
        """Forget a lost host (``Fleet.forget``), and tell the callbacks of the VMs that it
        ended."""
        for vm in await self.fleet.forget(host_id):
            await self._lifecycle.report(vm)

    async def _powered_off(self, vm_id: str) -> None:
        """Delete a VM of ``on_poweroff: delete`` whose guest powered off, as ``delete`` does,
        and tell its callback; one deleted meanwhile is left alone."""
        with contextlib.suppress(VMNotFound, StateConflict):
            await self._lifecycle.delete(vm_id, tell=True)
            log.info("VM %s powered off: deleted, as its on_poweroff asks", vm_id)
        self._freed()

    async def expire(self, vm_id: str) -> None:
        """Destroy a VM whose lease has ended, as ``delete`` does."""
        await self._lifecycle.delete(vm_id, expired=True)
        self._freed()

    async def events(
        self, after: int | None, wanted: VMFilter | None
    ) -> AsyncIterator[Event | None]:
        """The change log from after the event ``after`` (from now, without it); see
        ``service.events.stream``. A tenant's stream has the events of the images it sees
        (``ImageAccess``) only."""
        tenant = wanted.tenant if wanted is not None else None
        async for event in events.stream(self._db, after, wanted):
            if (
                tenant is not None
                and event is not None
                and event.kind in (EventKind.IMAGE, EventKind.IMAGE_DELETED)
            ):
                seen = await self._image_access.seen_by(tenant)
                if not self._image_access.sees(tenant, seen, event.data):
                    continue
            yield event

    async def console(
        self, vm_id: str, follow: bool, tenant: str | None = None
    ) -> AsyncIterator[str]:
        """The serial console, as text, of the VM if it is ``tenant``'s; see
        ``service.console``. A VM that failed has the end of its console in the store, which
        every host reads. Raises ``VMNotFound`` and ``ConsoleUnavailable`` before the first
        line."""
        vm_id = await self.resolve(vm_id, tenant)
        vm = await self._own(vm_id, tenant)
        if vm.status is Status.ERROR:
            kept = await self._db.read(lambda conn: vm_records.console(conn, vm_id))
            if kept is not None:
                return _once(kept)
        if not self.fleet.is_mine(vm):
            raise ConsoleUnavailable(
                f"the console of VM {vm_id} is kept by its host, {vm.host}, which this host "
                "cannot relay to (it advertises no URL, or this host has no fleet secret): ask "
                "that host's API"
            )
        path = self._driver.console_path(await self._lifecycle.machine(vm_id))
        if path is None:
            raise ConsoleUnavailable(f"the {self._driver.name} driver keeps no console of VMs")

        async def still_there() -> bool:
            try:
                await self._lifecycle.get(vm_id)
            except VMNotFound:
                return False
            return True

        return console.read(path, follow, still_there)

    async def elsewhere(self, vm_id: str, tenant: str | None = None) -> tuple[str, str] | None:
        """For the VM (if it is ``tenant``'s) when another host runs it and advertises where
        its API is: its ID and that URL, to relay to; ``None`` otherwise."""
        vm = await self._own(await self.resolve(vm_id, tenant), tenant)
        if self.fleet.is_mine(vm) or vm.host is None:
            return None
        url = await self.fleet.url_of(vm.host)
        return None if url is None else (vm.id, url)

    async def make_image(self, vm_id: str, build: ImageBuild, seen: str | None, to: str) -> Image:
        """``Builder.make`` of the VM, if it is ``seen``'s; the image is tenant ``to``'s."""
        vm = await self._own(await self.resolve(vm_id, seen), seen)
        return await self.builder.make(vm, build, to, self.fleet.is_mine(vm))

    async def channel(self, vm_id: str, tenant: str | None = None) -> Channel:
        """The channel to the helper in the guest of the VM, if it is ``tenant``'s and
        running here; raises ``VMNotFound``, ``VMConflict`` (not running) and
        ``ExecUnavailable``."""
        vm_id = await self.resolve(vm_id, tenant)
        vm = await self._own(vm_id, tenant)
        if vm.status is not Status.RUNNING:
            raise VMConflict(f"VM {vm_id} is {vm.status}: commands run in a running VM only")
        if not self.fleet.is_mine(vm):
            raise ExecUnavailable(
                f"VM {vm_id} runs on host {vm.host}, which this host cannot relay to (it "
                "advertises no URL, or this host has no fleet secret): ask that host's API"
            )
        machine = await self._lifecycle.machine(vm_id)
        return await self.channels.of(machine, f"VM {vm_id}")

    async def readiness(self) -> Readiness:
        """Whether the store and each part of the driver work, with the reason where not."""
        parts = {"store": await self._db.health(), **await self._driver.health()}
        return Readiness(
            status="ok" if all(reason is None for reason in parts.values()) else "failing",
            checks={
                name: Check(ok=reason is None, reason=reason) for name, reason in parts.items()
            },
        )

    def network_types(self) -> list[str]:
        """The network types that VMs can use on this host."""
        return list(self._driver.capabilities.network_types)

    async def metrics_text(self) -> bytes:
        """Every metric in Prometheus' text format (``service.metrics``)."""
        images = await self.catalog.images()
        host_id = self._db.host_id
        held = await self._db.read(lambda conn: host_records.held_by(conn, host_id))
        vms = await self._lifecycle.mine()
        return self.metrics.text(vms, images, held, await self._driver.dropped())

    def _image_changed(self, image: Image, deleted: bool) -> None:
        self.fleet.changed()
        if image.status is ImageStatus.READY and not deleted:
            self._lifecycle.spawn(self._image_access.ready(image.id))
        kind = EventKind.IMAGE_DELETED if deleted else EventKind.IMAGE
        data = image.model_dump(mode="json", exclude={"progress"})
        self._lifecycle.spawn(
            self._db.write(lambda conn: event_log.record(conn, kind, image.id, data))
        )
        if image.status is ImageStatus.READY and not deleted:
            self._lifecycle.spawn(self.catalog.trim())  # the cache grew

    def _with_progress(self, vm: VM) -> VM:
        if vm.status is Status.CREATING and vm.timeline[-1].phase is Phase.DOWNLOADING:
            return vm.model_copy(update={"progress": self._images.progress(vm.image)})
        return vm


async def _once(text: str) -> AsyncIterator[str]:
    yield text
