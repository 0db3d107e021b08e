"""The VM lifecycle: accept, fetch, clone, boot, find the IP, report; and destroy.

Each create runs as an asyncio task. Every change of state is written to the store before
the service acts on it, so that a restarted service knows what each VM was doing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections import Counter
from collections.abc import Coroutine
from typing import Any, get_args

import httpx

from goldclone.callbacks import deliver
from goldclone.config import Settings
from goldclone.drivers.base import Driver, MachineSpec, Runtime
from goldclone.errors import (
    BootFailed,
    CapacityExceeded,
    IdempotencyConflict,
    ImageInUse,
    Interrupted,
    InvalidRequest,
    URLForbidden,
    VMConflict,
    VMFailure,
    VMNotFound,
)
from goldclone.images.store import ImageStore
from goldclone.models import (
    VM,
    CreateVMRequest,
    ErrorBody,
    Image,
    ImageSpec,
    NetworkType,
    Phase,
    Status,
    TimelineEntry,
    now_ms,
)
from goldclone.models import now_s as _now_s
from goldclone.outbound import OutboundPolicy
from goldclone.store import Store

log = logging.getLogger(__name__)

_PROCESS_CHECK_INTERVAL = 0.5
# The VMs that count against the host's totals: they hold, or are about to hold, its CPUs
# and memory.
_HOLDING = (Status.CREATING, Status.RUNNING, Status.DELETING)


class VMService:
    """Owns every VM of this host: their creation tasks, their records and their teardown."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        images: ImageStore,
        driver: Driver,
        http: httpx.AsyncClient,
    ) -> None:
        self._settings = settings
        self._store = store
        self._images = images
        self._driver = driver
        self._http = http
        self._creating: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._image_locks: dict[str, asyncio.Lock] = {}
        self._admission = asyncio.Lock()
        self._outbound = OutboundPolicy(allow_private=settings.allow_private_urls)

    async def start(self) -> None:
        """Open the store and adopt the guests that kept running. What a stopped service left
        half-done is finished in the background, so that no guest can hold up the API."""
        await self._store.open()
        await self._driver.prepare()
        self._images.open()
        unfinished = []
        for vm in await self._store.list():
            if vm.status is Status.RUNNING:
                await self._adopt(vm)
            elif vm.status in (Status.CREATING, Status.DELETING):
                unfinished.append(vm.id)
        self._spawn(self._maintain(unfinished))

    async def close(self) -> None:
        """Stop background work. Running VMs keep running, with their networks; unfinished
        creates are cut off and finished as ``interrupted`` at the next start. With no VM
        running, the networks are removed too, so a stopped service leaves nothing behind."""
        tasks = [*self._creating.values(), *self._background]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._images.close()
        running = [await self._driver.is_running(vm.id) for vm in await self._store.list()]
        await self._driver.close(vms_running=any(running))
        await self._store.close()
        await self._http.aclose()

    # -- the API's operations --------------------------------------------------------------

    async def create(self, request: CreateVMRequest, idempotency_key: str | None = None) -> VM:
        """Accept a VM and start creating it in the background.

        A repeat with the same ``idempotency_key`` and body returns the VM the first request
        made; the same key with another body is an ``IdempotencyConflict``.
        """
        self._check_request(request)
        digest = hashlib.sha256(request.model_dump_json().encode()).hexdigest()
        async with self._admission:  # the totals are checked and taken in one step
            if idempotency_key is not None:
                earlier = await self._store.find_by_key(idempotency_key)
                if earlier is not None:
                    return self._repeat(earlier, digest)
            await self._check_capacity(request)
            vm = self._new_vm(request)
            key = (idempotency_key, digest) if idempotency_key is not None else None
            await self._store.insert(vm, idempotency=key)
        task = asyncio.create_task(self._build(vm), name=f"create {vm.id}")
        self._creating[vm.id] = task
        task.add_done_callback(lambda _: self._creating.pop(vm.id, None))
        return vm

    def _repeat(self, earlier: tuple[VM, str], digest: str) -> VM:
        vm, earlier_digest = earlier
        if earlier_digest != digest:
            raise IdempotencyConflict(
                "this Idempotency-Key was used with another request body; use a new key"
            )
        return self._with_progress(vm)

    async def _check_capacity(self, request: CreateVMRequest) -> None:
        """Raise ``CapacityExceeded`` if the VM would take the host past a total."""
        limits = self._settings.limits
        if all(t is None for t in (limits.max_vms, limits.total_cpus, limits.total_memory_mb)):
            return  # no totals: no need to read every VM on each create
        held = [vm for vm in await self._store.list() if vm.status in _HOLDING]
        for name, total, used, wanted in (
            ("VMs", limits.max_vms, len(held), 1),
            ("vCPUs", limits.total_cpus, sum(vm.cpus for vm in held), request.cpus),
            ("MB of memory", limits.total_memory_mb, sum(vm.memory for vm in held),
             request.memory),
        ):  # fmt: skip
            if total is not None and used + wanted > total:
                raise CapacityExceeded(
                    f"this host allows {total} {name} in all; {used} are in use and this VM "
                    f"needs {wanted}"
                )

    def _new_vm(self, request: CreateVMRequest) -> VM:
        return VM(
            id=str(uuid.uuid4()),
            image=request.image,
            cpus=request.cpus,
            memory=request.memory,
            network_type=request.network_type,
            headless=request.headless,
            callback_url=request.callback_url,
            created_at=_now_s(),
            timeline=[TimelineEntry(phase=Phase.ACCEPTED, at=now_ms())],
        )

    async def get(self, vm_id: str) -> VM:
        return self._with_progress(await self._refresh(await self._store.get(_valid_id(vm_id))))

    async def list_vms(self) -> list[VM]:
        vms = []
        for vm in await self._store.list():
            with contextlib.suppress(VMNotFound):  # deleted since the list was read
                vms.append(self._with_progress(await self._refresh(vm)))
        return vms

    def network_types(self) -> list[str]:
        """The network types that VMs can use on this host."""
        offered = []
        for network_type in get_args(NetworkType):
            try:
                self._driver.check_network(network_type)
            except InvalidRequest:
                continue
            offered.append(network_type)
        return offered

    async def images(self) -> list[Image]:
        """Every gold image, with how many VMs use each."""
        users = Counter(vm.image.key for vm in await self._store.list())
        return [
            image.model_copy(update={"vms": users[image.id]}) for image in self._images.images()
        ]

    def prefetch(self, spec: ImageSpec) -> Image:
        """Start fetching an image ahead of the first VM that needs it."""
        self._check_url("url", spec.url)
        self._images.prefetch(spec)
        image = self._images.image(spec.key)
        assert image is not None  # cached, or its fetch was just started
        return image

    async def delete_image(self, image_id: str) -> None:
        """Remove a gold image; refused with ``ImageInUse`` while any VM uses it."""
        async with self._image_lock(image_id):
            users = [vm.id for vm in await self._store.list() if vm.image.key == image_id]
            if users:
                raise ImageInUse(
                    f"image {image_id} is used by {len(users)} VM(s); delete them first"
                )
            await self._images.delete(image_id)

    async def delete(self, vm_id: str) -> None:
        """Cancel the VM's creation if it is under way, then destroy it and forget it.

        When the hypervisor refuses with ``VMConflict`` (it holds a lock), the VM stays
        recorded, as it was unless its creation was cut off, and a retry can finish the job.
        """
        vm_id = _valid_id(vm_id)
        async with self._lock(vm_id):
            vm = await self._store.get(vm_id)
            task = self._creating.get(vm_id)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                vm = await self._store.get(vm_id)
            await self._advance(vm, Phase.DELETING, status=Status.DELETING)
            try:
                await self._teardown(vm_id)
            except VMConflict:
                if task is None:
                    await self._store.save(vm)
                raise
            await self._store.delete(vm_id)
        self._locks.pop(vm_id, None)
        log.info("VM %s destroyed", vm_id)

    # -- creation ----------------------------------------------------------------------------

    def _check_request(self, request: CreateVMRequest) -> None:
        limits = self._settings.limits
        if not limits.min_cpus <= request.cpus <= limits.max_cpus:
            raise InvalidRequest(
                f"cpus: must be between {limits.min_cpus} and {limits.max_cpus} on this host"
            )
        if not limits.min_memory_mb <= request.memory <= limits.max_memory_mb:
            raise InvalidRequest(
                f"memory: must be between {limits.min_memory_mb} and "
                f"{limits.max_memory_mb} MB on this host"
            )
        self._driver.check_network(request.network_type)
        self._check_url("image.url", request.image.url)
        if request.callback_url is not None:
            self._check_url("callback_url", request.callback_url)

    def _check_url(self, field: str, url: str) -> None:
        """A URL whose host is an address is checked now; a name, when it is connected to."""
        try:
            self._outbound.check_literal(url)
        except URLForbidden as exc:
            raise InvalidRequest(f"{field}: {exc.message}") from None

    async def _build(self, vm: VM) -> None:
        try:
            vm = await self._boot(vm)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            vm = await self._fail(vm, exc)
        self._report(vm)

    def _report(self, vm: VM) -> None:
        """Deliver the VM's callback in the background."""
        settings = self._settings
        self._spawn(deliver(self._http, vm, settings.callback_attempts,
                            settings.callback_backoff, settings.callback_secret))  # fmt: skip

    async def _boot(self, vm: VM) -> VM:
        async def fetching() -> None:
            nonlocal vm
            vm = await self._advance(vm, Phase.DOWNLOADING)

        gold = await self._images.ensure(vm.image, on_fetch=fetching)
        vm = await self._advance(vm, Phase.CLONING)
        async with self._image_lock(vm.image.key):
            if not gold.root.exists():  # deleted since: fetch it again
                gold = await self._images.ensure(vm.image, on_fetch=fetching)
            await self._driver.clone(vm.id, gold)
        runtime = await self._driver.attach(vm.id, vm.network_type)
        await self._store.set_runtime(vm.id, runtime)
        vm = await self._advance(vm, Phase.BOOTING, mac_address=runtime["mac"])
        await self._driver.start(MachineSpec(vm.id, vm.cpus, vm.memory, vm.headless), runtime)
        ip = await self._wait_for_ip(vm.id, runtime)
        vm = await self._advance(vm, Phase.RUNNING, status=Status.RUNNING, ip_address=ip)
        log.info("VM %s is running at %s", vm.id, ip)
        return vm

    async def _wait_for_ip(self, vm_id: str, runtime: Runtime) -> str:
        """The guest's IP, unless its hypervisor process dies first."""
        lease = asyncio.create_task(
            self._driver.wait_for_ip(vm_id, runtime, self._settings.ip_timeout)
        )
        watch = asyncio.create_task(self._watch_process(vm_id))
        try:
            done, _ = await asyncio.wait({lease, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lease.cancel()
            watch.cancel()
        if lease in done:
            return lease.result()
        raise BootFailed("the VM's hypervisor process exited before the guest got an IP")

    async def _watch_process(self, vm_id: str) -> None:
        while await self._driver.is_running(vm_id):
            await asyncio.sleep(_PROCESS_CHECK_INTERVAL)

    async def _fail(self, vm: VM, exc: Exception) -> VM:
        if isinstance(exc, VMFailure):
            error = ErrorBody(code=exc.code, message=self._public(exc.message))
            log.warning("VM %s failed: %s: %s", vm.id, exc.code, exc.message)
        else:
            log.error("VM %s failed unexpectedly", vm.id, exc_info=exc)
            error = ErrorBody(
                code="internal-error", message="an internal error; see the server log"
            )
        await self._teardown(vm.id)
        return await self._advance(vm, Phase.ERROR, status=Status.ERROR, error=error)

    def _public(self, message: str) -> str:
        """``message`` without the host's data dir path in it."""
        return message.replace(str(self._settings.data_dir.absolute()), "$DATA_DIR")

    # -- state -------------------------------------------------------------------------------

    async def _advance(self, vm: VM, phase: Phase, **changes: Any) -> VM:
        entry = TimelineEntry(phase=phase, at=now_ms())
        vm = vm.model_copy(update={**changes, "timeline": [*vm.timeline, entry]})
        await self._store.save(vm)
        return vm

    async def _refresh(self, vm: VM) -> VM:
        """Notice a guest that powered itself off."""
        if vm.status is Status.RUNNING and not await self._driver.is_running(vm.id):
            async with self._lock(vm.id):
                vm = await self._store.get(vm.id)
                if vm.status is Status.RUNNING and not await self._driver.is_running(vm.id):
                    vm = await self._advance(vm, Phase.STOPPED, status=Status.STOPPED)
        return vm

    # -- restarts and reconciliation -------------------------------------------------------

    async def _adopt(self, vm: VM) -> None:
        """Take over a guest that kept running through a restart; one that did not is
        ``stopped``."""
        if runtime := await self._store.runtime(vm.id):
            await self._driver.adopt(vm.id, runtime)
        await self._refresh(vm)

    async def _maintain(self, unfinished: list[str]) -> None:
        """Finish the VMs a stopped service left half-done, then check the host against the
        store, now and every ``reconcile_interval`` seconds."""
        await asyncio.gather(*(self._finish(vm_id) for vm_id in unfinished))
        while True:
            await self._reconcile()
            await asyncio.sleep(self._settings.reconcile_interval)

    async def _finish(self, vm_id: str) -> None:
        """An interrupted create ends in ``error`` (``interrupted``) with everything of it
        removed and its callback sent; an interrupted DELETE is completed."""
        try:
            async with self._lock(vm_id):
                vm = await self._store.get(vm_id)
                if vm.status is Status.CREATING:
                    stopped = Interrupted("the service stopped while this VM was being created")
                    self._report(await self._fail(vm, stopped))
                elif vm.status is Status.DELETING:
                    await self._teardown(vm_id)
                    await self._store.delete(vm_id)
        except VMNotFound:
            pass  # a DELETE came first
        except Exception:
            log.exception("could not finish VM %s; the next start tries again", vm_id)

    async def _reconcile(self) -> None:
        """Destroy whatever the store does not know, and mark guests that are gone
        ``stopped``. A failed pass is logged, and the next one tries again."""
        try:
            await self._driver.remove_orphans(self._known_ids)
            for vm in await self._store.list():
                with contextlib.suppress(VMNotFound):
                    await self._refresh(vm)
        except Exception:
            log.exception("checking the host against the store failed")

    async def _known_ids(self) -> set[str]:
        return {vm.id for vm in await self._store.list()}

    async def _teardown(self, vm_id: str) -> None:
        """Remove every part of the VM: process, clone, NIC and lease. Safe to repeat."""
        await self._driver.destroy(vm_id, await self._store.runtime(vm_id) or None)

    def _lock(self, vm_id: str) -> asyncio.Lock:
        return self._locks.setdefault(vm_id, asyncio.Lock())

    def _image_lock(self, image_id: str) -> asyncio.Lock:
        """Held while a clone is made from the image, and while the image is deleted."""
        return self._image_locks.setdefault(image_id, asyncio.Lock())

    def _with_progress(self, vm: VM) -> VM:
        if vm.status is Status.CREATING and vm.timeline[-1].phase is Phase.DOWNLOADING:
            return vm.model_copy(update={"progress": self._images.progress(vm.image)})
        return vm

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _valid_id(vm_id: str) -> str:
    """A malformed ID can name no VM, so it is a plain 404."""
    try:
        return str(uuid.UUID(vm_id))
    except ValueError:
        raise VMNotFound() from None
