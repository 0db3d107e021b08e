"""Warm pools: machines of one gold image and shape, restored from its memory template and
kept running, with nothing of any request in them, so that a ``POST /vms`` of that image and
shape claims one (in its admission's transaction, ``Admission.record``) and is running as soon as
the guest has taken the request's identity.

Each pool has a keeper task: it fetches the image, has the template made, restores machines
until the pool is full, and replaces those that died or were claimed. Trouble (a failed image
or template, a host at capacity) is shown as the pool's ``error`` and tried again later, less
often each time. Pools and their machines are stored; after a restart, the machines that still
run stay in their pool and the others are removed. A pool is the fleet's and its ``size`` is
per host: each host keeps the pools that any host made, changed or removed, as it hears of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

from goldclone.clock import now_s
from goldclone.drivers.base import Driver, MachineSpec, Runtime
from goldclone.errors import GoldcloneError, InvalidRequest, PoolNotFound
from goldclone.fields import is_dns_label
from goldclone.guest.config import GuestConfig, needs_first_boot
from goldclone.image_spec import ImageSpec
from goldclone.images.cache import ImageCache
from goldclone.models import CreateVMRequest, ErrorBody, Pool, PoolRequest
from goldclone.service.admission import Admission
from goldclone.service.machines import bring_up
from goldclone.service.pinning import Pinning
from goldclone.service.sizing import fit_cached_disk
from goldclone.service.templates import Templates
from goldclone.settings import Settings
from goldclone.shape import Shape
from goldclone.store import event_log, pool_records
from goldclone.store.database import Database
from goldclone.store.host_records import Held
from goldclone.store.pool_records import Member, MemberStatus

log = logging.getLogger(__name__)

RETRY_FIRST = 2.0
RETRY_MOST = 300.0
"""Seconds before a keeper tries again after trouble: doubling from the first to the most."""


class Pools:
    """The warm pools of this host."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        images: ImageCache,
        driver: Driver,
        admission: Admission,
        templates: Templates,
    ) -> None:
        self._settings = settings
        self._db = db
        self._images = images
        self._driver = driver
        self._admission = admission
        self._templates = templates
        self._pools: dict[str, Pool] = {}
        """Each pool's definition, for ``matching`` to read without the store."""
        self._keepers: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._changing = asyncio.Lock()
        """Held while the pools' definitions change: by a request here, or another host's."""
        self._follower: asyncio.Task[None] | None = None
        self.pinning: Pinning | None = None
        """Resolves a put pool's tag; none: a tag is refused (set by the service)."""

    async def start(self) -> None:
        """Keep the stored pools: their machines that still run stay, the others go."""
        self._pools = {pool.name: pool for pool in await self._counted()}
        for member in await self._members():
            pool = self._pools.get(member.pool)
            if pool is None or member.status != "ready" or not await self._runs(member):
                await self._remove(member)
        for name in self._pools:
            self._keep(name)
        if self._db.shared:
            self._follower = asyncio.create_task(
                self._db.changes.follow(
                    self._follow_fleet, "following the fleet's pools", event_log.POOLS
                ),
                name="follow the fleet's pools",
            )

    async def close(self) -> None:
        """Stop the keepers; the machines being restored are removed, the ready ones run on."""
        keepers = [*self._keepers.values(), *filter(None, [self._follower])]
        for keeper in keepers:
            keeper.cancel()
        await asyncio.gather(*keepers, return_exceptions=True)

    def matching(self, request: CreateVMRequest) -> list[str]:
        """The pools whose machines ``request`` may claim: those of its image and shape,
        unless it asks for a cold boot, a window, or ``#cloud-config`` user data (which needs
        a first boot)."""
        if request.start == "cold" or not request.headless:
            return []
        if needs_first_boot(request.user_data):
            return []
        gold = self._images.resolve
        kind = (gold(request.image.key), Shape.of(request), request.network_type)
        return [
            pool.name
            for pool in self._pools.values()
            if (gold(pool.image.key), Shape.of(pool), pool.network_type) == kind
        ]

    def images(self) -> list[ImageSpec]:
        """The image of every pool, pinned."""
        return [pool.image for pool in self._pools.values()]

    async def put(self, name: str, request: PoolRequest) -> tuple[Pool, bool]:
        """Make the pool ``name``, or change it: the pool and whether it is new. A pool whose
        image or shape changes loses its machines and fills again; a tag is resolved anew."""
        self._check(name, request)
        if self.pinning is not None:
            image = await self.pinning.pin(request.image, "image", pools=False)
            request = request.model_copy(update={"image": image})
        await fit_cached_disk(self._images, request)
        async with self._changing:
            earlier = self._pools.get(name)
            kept: dict[str, object] = {"created_at": now_s(), "claimed": 0}
            if earlier is not None:
                kept = {"created_at": earlier.created_at, "claimed": earlier.claimed}
            pool = Pool.model_validate({"name": name, **request.model_dump(), **kept})
            created = await self._put(pool)
            await self._take_up(pool)
        return await self._one(name), created

    async def get(self, name: str) -> Pool:
        if name not in self._pools:
            raise PoolNotFound(f"there is no pool {name!r}", pool=name)
        return await self._one(name)

    async def all(self) -> list[Pool]:
        return await self._counted()

    async def delete(self, name: str) -> None:
        """Remove the pool and its unclaimed machines; VMs claimed from it stay."""
        async with self._changing:
            if name not in self._pools:
                raise PoolNotFound(f"there is no pool {name!r}", pool=name)
            host_id = self._db.host_id
            await self._db.write(lambda conn: pool_records.forget(conn, host_id, name))
            await self._drop(name)

    async def _follow_fleet(self) -> None:
        """Keep what the stored definitions now say: pools that other hosts made or changed
        are kept here too, and those they removed are dropped."""
        async with self._changing:
            stored = {pool.name: pool for pool in await self._counted()}
            for name in self._pools.keys() - stored.keys():
                await self._drop(name)
            for name, pool in stored.items():
                earlier = self._pools.get(name)
                if earlier is None or _definition(earlier) != _definition(pool):
                    # the error shown is the last that a host met; this host keeps its own
                    await self._take_up(
                        pool.model_copy(update={"error": earlier and earlier.error})
                    )

    async def _take_up(self, pool: Pool) -> None:
        """Keep ``pool`` as now defined: one whose image or shape changed loses its machines."""
        earlier = self._pools.get(pool.name)
        self._pools[pool.name] = pool
        if earlier is not None and _kind(earlier) != _kind(pool):
            await self._stop_keeper(pool.name)
            await self._remove_members(pool.name)
        self._keep(pool.name)
        self.wake(pool.name)

    async def _drop(self, name: str) -> None:
        """Stop keeping the pool ``name`` and remove its machines (it is no longer stored)."""
        await self._stop_keeper(name)
        del self._pools[name]
        await self._remove_members(name)

    async def _remove_members(self, name: str) -> None:
        for member in await self._members(name):
            await self._remove(member)

    def image_users(self, image_id: str, shape: Shape | None = None) -> list[str]:
        """The pools that keep machines of the gold image ``image_id`` (in ``shape``, if
        given: those restored from its template of that shape)."""
        return [pool.name for pool in self._pools.values()
                if self._images.resolve(pool.image.key) == image_id
                and shape in (None, Shape.of(pool))]  # fmt: skip

    def wake(self, name: str | None = None) -> None:
        """Have the keeper of pool ``name`` (or of every pool) look again: a machine was
        claimed, or room was made on the host."""
        for pool, event in self._wake.items():
            if name is None or pool == name:
                event.set()

    def _check(self, name: str, request: PoolRequest) -> None:
        if not is_dns_label(name):
            raise InvalidRequest(
                "name: must be a DNS label: 1-63 characters of a-z, 0-9 and '-', not starting "
                "or ending with '-'"
            )
        if not self._driver.capabilities.memory_templates:
            raise InvalidRequest(
                f"the {self._driver.name} driver has no memory templates, which pools restore "
                "their VMs from"
            )
        self._admission.check_shape(Shape.of(request), None)
        self._admission.check_network(request.network_type)
        self._admission.check_image("image", request.image)
        most = self._settings.limits.max_vms
        if most is not None and request.size > most:
            raise InvalidRequest(f"size: this host allows {most} VMs in all")

    def _keep(self, name: str) -> None:
        if name not in self._keepers:
            self._wake[name] = asyncio.Event()
            keeper = asyncio.create_task(self._keeper(name), name=f"pool {name}")
            self._keepers[name] = keeper

    async def _stop_keeper(self, name: str) -> None:
        keeper = self._keepers.pop(name, None)
        self._wake.pop(name, None)
        if keeper is not None:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)

    async def _keeper(self, name: str) -> None:
        wait = RETRY_FIRST
        while True:
            wake = self._wake[name]
            wake.clear()
            try:
                await self._fill(self._pools[name])
            except Exception as exc:  # shown and tried again: a keeper never gives up
                if not isinstance(exc, GoldcloneError):
                    log.error("pool %s: unexpected trouble", name, exc_info=exc)
                await self._trouble(name, exc)
                pause, wait = wait, min(2 * wait, RETRY_MOST)
            else:
                await self._trouble(name, None)
                pause, wait = self._settings.reconcile_interval, RETRY_FIRST
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):  # not wait_for, which can lose a cancel
                    await wake.wait()

    async def _fill(self, pool: Pool) -> None:
        """Remove the pool's machines that died, or that it has too many of; restore the
        ones it lacks, one at a time."""
        members = []
        for member in await self._members(pool.name):
            if member.status == "ready" and not await self._runs(member):
                log.warning("pool %s: machine %s stopped; it is replaced", pool.name,
                            member.machine)  # fmt: skip
                await self._remove(member)
            else:
                members.append(member)
        for member in members[pool.size :]:
            await self._remove(member)
        for _ in range(pool.size - len(members)):
            await self._restore_one(pool)

    async def _restore_one(self, pool: Pool) -> None:
        gold = await self._images.ensure(pool.image)
        template = await self._templates.made(gold.key, Shape.of(pool))
        machine = str(uuid.uuid4())
        await self._admission.add_member(pool.name, machine, Held(pool.cpus, pool.memory))
        member = Member(machine, pool.name, "filling", {})
        try:
            async with self._images.lock(gold.key):
                await self._driver.clone(machine, gold, template)

            async def attached(runtime: Runtime) -> None:
                await self._set_member(machine, runtime=runtime.record())

            guest = GuestConfig(machine, f"pool-{pool.name}"[:63].rstrip("-"))
            spec = MachineSpec(machine, pool.cpus, pool.memory, True, guest, template, True)
            await bring_up(self._driver, spec, pool.network_type, attached,
                           self._settings.ip_timeout)  # fmt: skip
        except BaseException:
            await self._remove(member)
            raise
        await self._set_member(machine, status="ready")
        log.info("pool %s: machine %s is ready", pool.name, machine)

    async def _runs(self, member: Member) -> bool:
        return await self._driver.is_running(member.machine)

    async def _remove(self, member: Member) -> None:
        """Destroy a pooled machine and forget it; what cannot be removed is left to
        reconciliation, which finds it unknown."""
        runtime = None
        if member.runtime:
            runtime = self._driver.runtime_from_record(member.machine, member.runtime)
        try:
            await self._driver.destroy(member.machine, runtime, graceful=False)
        except GoldcloneError as exc:
            log.warning("pool %s: machine %s: %s; reconciliation removes it", member.pool,
                        member.machine, exc)  # fmt: skip
        host_id, machine = self._db.host_id, member.machine
        await self._db.write(lambda conn: pool_records.forget_member(conn, host_id, machine))

    async def _counted(self) -> list[Pool]:
        """Every pool, oldest first, with how many machines this host has ready and filling
        for it."""
        host_id = self._db.host_id
        return await self._db.read(lambda conn: pool_records.counted(conn, host_id))

    async def _one(self, name: str) -> Pool:
        host_id = self._db.host_id
        return await self._db.read(lambda conn: pool_records.one(conn, host_id, name))

    async def _members(self, pool: str | None = None) -> list[Member]:
        host_id = self._db.host_id
        return await self._db.read(lambda conn: pool_records.members(conn, host_id, pool))

    async def _put(self, pool: Pool) -> bool:
        host_id = self._db.host_id
        return await self._db.write(lambda conn: pool_records.put(conn, pool, host_id))

    async def _set_member(
        self,
        machine: str,
        status: MemberStatus | None = None,
        runtime: dict[str, str] | None = None,
    ) -> None:
        host_id = self._db.host_id
        await self._db.write(
            lambda conn: pool_records.set_member(conn, host_id, machine, status, runtime)
        )

    async def _trouble(self, name: str, exc: BaseException | None) -> None:
        """Show ``exc`` as the pool's error, or clear the error it had."""
        pool = self._pools.get(name)
        if pool is None:
            return
        error = None
        if exc is not None:
            error = _error_of(exc)
            log.warning("pool %s cannot be filled: %s", name, error.message)
        if pool.error != error:
            pool = self._pools[name] = pool.model_copy(update={"error": error})
            await self._put(pool)


def _kind(pool: Pool) -> tuple[object, ...]:
    """What a pool's machines are: those of another kind are of no use to it."""
    return (pool.image.key, Shape.of(pool), pool.network_type)


def _definition(pool: Pool) -> tuple[object, ...]:
    """What a request defines of a pool: its kind and its size."""
    return (*_kind(pool), pool.size)


def _error_of(exc: BaseException) -> ErrorBody:
    if isinstance(exc, GoldcloneError):
        return ErrorBody(code=exc.code, message=exc.message)
    if isinstance(exc, OSError):  # its text may name a path on the host: not for the API
        return ErrorBody(code="internal-error", message=f"a host error: {exc.strerror}")
    return ErrorBody(code="internal-error", message="an internal error; see the server log")
