"""Where VMs are recorded, and the VM state machine: SQLAlchemy over SQLite by default, so that
PostgreSQL can take its place.

A VM is stored as its API object (JSON) plus its driver's runtime record, which only the
driver reads. Every change of a VM's state is one transaction that reads the row under a write
lock (``BEGIN IMMEDIATE`` on SQLite, ``SELECT ... FOR UPDATE`` elsewhere), checks that the VM
is in a state the change expects, and writes the new state: a compare-and-set, so that two
actors (a create task and a DELETE, two services on one database) never overwrite each other.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from sqlalchemy import event, func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from goldclone.errors import (
    HostLost,
    HostNotFound,
    HostUp,
    NameConflict,
    PoolNotFound,
    StateConflict,
    VMNotFound,
)
from goldclone.models import (
    VM,
    ErrorBody,
    Phase,
    Pool,
    PoolStatus,
    Status,
    Template,
    TemplateStatus,
    TimelineEntry,
    now_ms,
)
from goldclone.service import events, schema
from goldclone.service.events import Changes, Event, EventKind
from goldclone.service.tables import cleanups as _cleanups
from goldclone.service.tables import deliveries as _deliveries
from goldclone.service.tables import handoffs as _handoffs
from goldclone.service.tables import hosts as _hosts
from goldclone.service.tables import image_checksums as _checksums
from goldclone.service.tables import pool_members as _members
from goldclone.service.tables import pools as _pools
from goldclone.service.tables import templates as _templates
from goldclone.service.tables import vms as _vms
from goldclone.service.whole import every_call_to_the_end

_HOSTS_PARTS = (_cleanups, _templates, _members, _deliveries, _handoffs)
"""What stands for one host's machines and files, besides its VMs."""

# The VMs that count against the host's totals: they hold, or are about to hold, its CPUs
# and memory.
HOLDING = (Status.CREATING, Status.RUNNING, Status.DELETING)
LIVE = tuple(status for status in Status if status is not Status.DELETING)
"""The VMs that a change (a renewal, an expiry) may still reach."""

TRANSITIONS: Mapping[Status, frozenset[Status]] = {
    Status.CREATING: frozenset({Status.CREATING, Status.RUNNING, Status.ERROR, Status.DELETING}),
    Status.RUNNING: frozenset({Status.STOPPED, Status.DELETING}),
    Status.STOPPED: frozenset({Status.DELETING}),
    Status.ERROR: frozenset({Status.DELETING}),
    # a DELETE that is retried, or refused by the hypervisor (the VM is put back as it was)
    Status.DELETING: frozenset({Status.DELETING, Status.RUNNING, Status.STOPPED, Status.ERROR}),
}
"""Each status, and the statuses a VM in it may change to."""


@dataclass(frozen=True)
class Delivery:
    """A callback still to deliver: the VM as it was when it was told, and the attempts so
    far."""

    message_id: str
    vm_id: str
    url: str
    body: str
    attempts: int
    next_at: str


@dataclass(frozen=True)
class Leftover:
    """What the teardown of a VM's machine could not remove: the machine and its runtime
    record, for the driver to destroy again, and why the last attempt failed."""

    vm_id: str
    machine: str
    runtime: dict[str, str]
    reason: str
    attempts: int = 0
    seq: int = 0


class Held(NamedTuple):
    """What one VM or pooled machine holds of the host, and the network group it is in."""

    cpus: int
    memory: int
    group: str | None = None


MemberStatus = Literal["filling", "ready"]


@dataclass(frozen=True)
class Member:
    """A machine that a warm pool keeps: being restored (``filling``), or ``ready`` to be
    claimed; with its driver's runtime record once it has one."""

    machine: str
    pool: str
    status: MemberStatus
    runtime: dict[str, str]


@dataclass(frozen=True)
class Candidate:
    """A host that a new VM could be placed on: one that is up, with what it offers and
    holds, and whether it has a ready machine of a matching pool (``pooled``), holds the
    image (``holds_image``) and has a ready template of it in the VM's shape
    (``templated``)."""

    host_id: str
    host: dict[str, Any]
    held: list[Held]
    pooled: bool
    holds_image: bool
    templated: bool


@dataclass(frozen=True)
class Placing:
    """What ``Store.admit`` needs to place a VM: the image (its key, as the request names
    it), its shape, the oldest heartbeat of a host that is up, and the policy that chooses
    among the candidates (raising ``CapacityExceeded`` when none has room)."""

    image_key: str
    cpus: int
    memory: int
    since: str
    choose: Callable[[list[Candidate]], Candidate]


@dataclass(frozen=True)
class HostRecord:
    """A host on the database: what it offers (``host``), its last heartbeat, and what its
    VMs and pools' machines hold."""

    id: str
    host: dict[str, Any]
    heartbeat_at: str
    held: list[Held]


@dataclass(frozen=True)
class Earlier:
    """The VM that an earlier request with the same idempotency key made, and the digest of
    that request's body."""

    vm: VM
    digest: str


@every_call_to_the_end  # a cancelled caller never cuts a transaction off
class Store:
    """VM records, keyed by ID. Every method is one short transaction.

    Several hosts may share one database (PostgreSQL): each service's store is that of its
    ``host_id``. What stands for its own machines and files (VMs, pools' machines, templates,
    cleanups, callbacks) it writes with its host ID, and counts, lists for reconciliation and
    retries only its own; ``list(all_hosts=True)``, ``get`` and events see the whole fleet.
    """

    def __init__(self, url: str, host_id: str) -> None:
        self.host_id = host_id
        sqlite = url.startswith("sqlite")
        # SQLite's connections are threads of this process; 50 VMs restored at once, each
        # polled by its client, waited past the default pool's 30 s for one
        pool = {"pool_size": 20, "max_overflow": 40} if sqlite else {}
        self._engine: AsyncEngine = create_async_engine(url, **pool)
        if self._engine.dialect.name == "sqlite":
            event.listen(self._engine.sync_engine, "connect", _sqlite_for_concurrency)
            event.listen(self._engine.sync_engine, "begin", _sqlite_begin)
        self._writer = self._engine.execution_options(goldclone_write=True)
        self._one_writer = asyncio.Lock() if self._engine.dialect.name == "sqlite" else None
        self.changes = Changes()
        self.on_phase: Callable[[VM], None] | None = None
        """Told of each VM that got a new phase, once it is committed."""

    @property
    def shared(self) -> bool:
        """Whether other services may share this database (PostgreSQL, not SQLite)."""
        return self._engine.dialect.name == "postgresql"

    @contextlib.asynccontextmanager
    async def _write(self, announce: bool = True) -> AsyncIterator[AsyncConnection]:
        """A write transaction. SQLite has one writer at a time: this service's writers queue
        here, on the event loop, rather than in SQLite's busy handler, which gives up after
        ``busy_timeout`` (50 concurrent creates on a loaded host waited longer, and failed
        with "database is locked"); the busy handler is left to other processes. Its commit
        wakes this service's waiters unless it ``announce``s nothing."""
        async with contextlib.AsyncExitStack() as stack:
            if self._one_writer is not None:
                await stack.enter_async_context(self._one_writer)
            conn = await stack.enter_async_context(self._writer.begin())
            try:
                yield conn
            finally:
                touched = events.take_touched(conn)
        if announce:
            self.changes.notify(touched)  # committed

    async def open(self) -> None:
        """Bring the database to this code's schema (``service.schema``). On PostgreSQL,
        services that start at once migrate one after another (each of three creating
        ``alembic_version`` failed all but one): the schema's changes are transactional
        there, and the lock is held until they commit."""
        async with self._write() as conn:
            if self.shared:
                await conn.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK}
                )
            await conn.run_sync(schema.upgrade)
            await self._adopt_unowned(conn)

    async def _adopt_unowned(self, conn: AsyncConnection) -> None:
        """Make this host's what was recorded before hosts existed (revision 0008), by the one
        host there was."""
        query = select(_vms.c.id, _vms.c.vm).where(_vms.c.host_id.is_(None))
        for row in (await conn.execute(query)).all():
            vm = {**row.vm, "host": self.host_id}
            await conn.execute(
                _vms.update().where(_vms.c.id == row.id).values(vm=vm, host_id=self.host_id)
            )
        for table in _HOSTS_PARTS:
            await conn.execute(
                table.update().where(table.c.host_id.is_(None)).values(host_id=self.host_id)
            )

    async def close(self) -> None:
        await self._engine.dispose()

    async def health(self) -> str | None:
        """Why the database cannot be read, or ``None``."""
        try:
            async with self._engine.connect() as conn:
                await conn.execute(select(_vms.c.seq).limit(1))
        except Exception as exc:  # whatever the database driver raises
            return f"the store cannot be read: {type(exc).__name__}"
        return None

    async def admit(
        self,
        vm: VM,
        idempotency: tuple[str, str] | None = None,
        placing: Placing | None = None,
        pools: Sequence[str] = (),
        request: str | None = None,
    ) -> VM | Earlier:
        """Record a new VM and return it as recorded, unless ``idempotency`` (the request's
        key and the digest of its body) was seen before: then nothing is recorded and the
        earlier VM is returned.

        With ``placing``, the VM goes to the host that its policy chooses among the hosts that
        are up (this one, without it). All of this is one transaction, after every other
        admission to the fleet (``_admitting``), so concurrent creates on any hosts can't
        both take a host's last place. If one of ``pools`` has a ready machine on that host,
        the VM claims it: the machine leaves its pool and becomes the VM's (its runtime
        record is the VM's), and the VM is recorded ``started_from: "pool"``; so no two VMs
        claim one machine. A VM placed on another host is handed to it with ``request`` (its
        JSON), which that host takes (``take_handoffs``). A ``vm.name`` that a recorded VM
        has is a ``NameConflict``.
        """
        key, digest = idempotency or (None, None)
        try:
            async with self._write() as conn:
                await _admitting(conn)
                if key is not None and (earlier := await _find_by_key(conn, key)) is not None:
                    return earlier
                await _check_name_free(conn, vm.name)
                host = self.host_id
                if placing is not None:
                    host = placing.choose(await _candidates(conn, placing, pools)).host_id
                runtime: dict[str, str] = {}
                if (member := await _claim(conn, pools, host)) is not None:
                    vm = vm.model_copy(update={"started_from": "pool", "pool": member.pool})
                    runtime = member.runtime
                vm = vm.model_copy(update={"host": host})
                await conn.execute(
                    _vms.insert().values(
                        id=vm.id, status=vm.status.value, vm=_dump(vm), runtime=runtime,
                        host_id=host,
                        idempotency_key=key, request_digest=digest, name=vm.name,
                        expires_at=vm.expires_at,
                    )
                )  # fmt: skip
                if host != self.host_id:
                    assert request is not None, "a VM for another host needs its request"
                    await conn.execute(
                        _handoffs.insert().values(vm_id=vm.id, host_id=host, request=request)
                    )
                await events.record(conn, EventKind.VM, vm.id, _dump(vm))
                if member is not None:
                    await _pool_event(conn, member.pool, host)
        except IntegrityError:
            # another service on this database took the key or the name between our read and
            # our insert
            async with self._engine.connect() as conn:
                if key is not None and (earlier := await _find_by_key(conn, key)) is not None:
                    return earlier
                await _check_name_free(conn, vm.name)
            raise
        return vm

    async def advance(
        self,
        vm_id: str,
        phase: Phase,
        expect: Status | tuple[Status, ...],
        status: Status | None = None,
        **fields: Any,
    ) -> VM:
        """Add ``phase`` to the VM's timeline and set ``status`` (by default, it keeps its own)
        and ``fields``, if the VM's status is ``expect`` now.

        Raises ``VMNotFound`` if it is gone and ``StateConflict`` if it is in another state,
        or if the change is not one that ``TRANSITIONS`` allows.
        """
        return await self._change(vm_id, phase, expect, status, fields)

    async def amend(self, vm_id: str, expect: Status | tuple[Status, ...], **fields: Any) -> VM:
        """Set the VM's ``fields`` (its labels, its lease), without a phase, if its status is
        ``expect`` now; raises as ``advance``."""
        return await self._change(vm_id, None, expect, None, fields)

    async def _change(
        self,
        vm_id: str,
        phase: Phase | None,
        expect: Status | tuple[Status, ...],
        status: Status | None,
        fields: Mapping[str, Any],
    ) -> VM:
        expected = (expect,) if isinstance(expect, Status) else expect
        async with self._write() as conn:
            current = await _locked(conn, vm_id)
            target = status or current.status
            allowed = phase is None or target in TRANSITIONS[current.status]
            if current.status not in expected or not allowed:
                change = "this change" if phase is None else phase.value
                raise StateConflict(
                    f"VM {vm_id} is {current.status.value}; {change} needs it "
                    f"{' or '.join(s.value for s in expected)}"
                )
            timeline = current.timeline
            if phase is not None:
                timeline = [*timeline, TimelineEntry(phase=phase, at=now_ms())]
            vm = current.model_copy(update={**fields, "status": target, "timeline": timeline})
            await _write(conn, vm)
        if phase is not None and self.on_phase is not None:
            self.on_phase(vm)
        return vm

    async def expired(self, now: str) -> builtins.list[str]:
        """The IDs of this host's VMs whose lease ended at ``now`` or before, but not deleting
        yet."""
        query = select(_vms.c.id).where(
            _vms.c.expires_at <= now,
            _vms.c.status != Status.DELETING.value,
            _vms.c.host_id == self.host_id,
        )
        async with self._engine.connect() as conn:
            return [row.id for row in await conn.execute(query.order_by(_vms.c.expires_at))]

    async def restore(self, vm: VM) -> None:
        """Put back ``vm`` as it was before a DELETE that the hypervisor refused, if the VM is
        still ``deleting``."""
        async with self._write() as conn:
            current = await _locked(conn, vm.id)
            if current.status is not Status.DELETING:
                raise StateConflict(f"VM {vm.id} is {current.status.value}, not deleting")
            await _write(conn, vm)

    async def set_runtime(self, vm_id: str, record: Mapping[str, str]) -> None:
        """Record the driver's runtime of the VM's machine."""
        async with self._write() as conn:
            events.touched(conn, vm_id)
            result = await conn.execute(
                _vms.update().where(_vms.c.id == vm_id).values(runtime=dict(record))
            )
            if result.rowcount == 0:
                raise VMNotFound()

    async def get(self, vm_id: str) -> VM:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(_vms.c.vm).where(_vms.c.id == vm_id))).first()
        if row is None:
            raise VMNotFound()
        return VM.model_validate(row.vm)

    async def runtime(self, vm_id: str) -> dict[str, str]:
        """The runtime record of the VM's machine; empty until the driver has made one."""
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(_vms.c.runtime).where(_vms.c.id == vm_id))).first()
        if row is None:
            raise VMNotFound()
        return dict(row.runtime)

    async def list(self, all_hosts: bool = False) -> list[VM]:
        """This host's VMs (every host's, with ``all_hosts``), in the order they were
        accepted."""
        query = select(_vms.c.vm).order_by(_vms.c.seq)
        if not all_hosts:
            query = query.where(_vms.c.host_id == self.host_id)
        async with self._engine.connect() as conn:
            return [VM.model_validate(row.vm) for row in await conn.execute(query)]

    async def holding(self) -> builtins.list[Held]:
        """What holds the host's resources now: VMs and the machines of warm pools."""
        async with self._engine.connect() as conn:
            return await _holding(conn, self.host_id)

    async def machines(self) -> set[str]:
        """The names of the machines of this host's VMs (the one in its runtime record, or
        the VM's ID while it has none), of its templates being made and of every machine that
        it keeps for a pool."""
        mine = self.host_id
        async with self._engine.connect() as conn:
            query = select(_vms.c.id, _vms.c.runtime).where(_vms.c.host_id == mine)
            vms = {row.runtime.get("machine", row.id) for row in await conn.execute(query)}
            query = select(_templates.c.machine).where(
                _templates.c.machine.is_not(None), _templates.c.host_id == mine
            )
            templates = {row.machine for row in await conn.execute(query)}
            query = select(_members.c.machine).where(_members.c.host_id == mine)
            members = {row.machine for row in await conn.execute(query)}
            return vms | templates | members

    # -- callbacks still to deliver --------------------------------------------------------

    async def add_delivery(self, delivery: Delivery) -> None:
        async with self._write() as conn:
            await conn.execute(_deliveries.insert().values(
                message_id=delivery.message_id, vm_id=delivery.vm_id, url=delivery.url,
                body=delivery.body, attempts=delivery.attempts, next_at=delivery.next_at,
                host_id=self.host_id,
            ))  # fmt: skip

    async def due_deliveries(self, now: str, limit: int) -> builtins.list[Delivery]:
        """This host's deliveries whose next attempt is due at ``now``, the earliest first."""
        query = (
            select(_deliveries)
            .where(_deliveries.c.next_at <= now, _deliveries.c.host_id == self.host_id)
            .order_by(_deliveries.c.next_at)
            .limit(limit)
        )
        async with self._engine.connect() as conn:
            return [_delivery(row) for row in await conn.execute(query)]

    async def next_delivery_at(self) -> str | None:
        query = select(func.min(_deliveries.c.next_at)).where(_deliveries.c.host_id == self.host_id)
        async with self._engine.connect() as conn:
            found: str | None = (await conn.execute(query)).scalar()
            return found

    async def delivery_tried(self, message_id: str, next_at: str | None) -> None:
        """Count an attempt of the delivery, due again at ``next_at``; without one, it is
        over and forgotten."""
        where = _deliveries.c.message_id == message_id
        async with self._write() as conn:
            if next_at is None:
                await conn.execute(_deliveries.delete().where(where))
            else:
                await conn.execute(_deliveries.update().where(where).values(
                    attempts=_deliveries.c.attempts + 1, next_at=next_at
                ))  # fmt: skip

    # -- checksums of image packages ------------------------------------------------------

    async def checksums(self) -> dict[str, str]:
        """Every checksum verified against an image package (``md5-<hex>``), with the sha256
        of that package."""
        async with self._engine.connect() as conn:
            rows = await conn.execute(select(_checksums.c.name, _checksums.c.sha256))
            return {row.name: row.sha256 for row in rows}

    async def add_checksum(self, name: str, sha256: str) -> None:
        """Remember that the checksum ``name`` was verified against the package ``sha256``."""
        async with self._write() as conn:
            await conn.execute(_checksums.delete().where(_checksums.c.name == name))
            await conn.execute(_checksums.insert().values(name=name, sha256=sha256, at=now_ms()))

    # -- events ---------------------------------------------------------------------------

    async def record_event(self, kind: EventKind, subject: str, data: Mapping[str, Any]) -> None:
        """Log a change that is not the store's own (an image's)."""
        async with self._write() as conn:
            await events.record(conn, kind, subject, data)

    async def events_after(self, after: int, limit: int = 500) -> tuple[builtins.list[Event], int]:
        """See ``events.read_after``."""
        async with self._engine.connect() as conn:
            return await events.read_after(conn, after, limit)

    async def last_event_id(self) -> int:
        async with self._engine.connect() as conn:
            return await events.last_id(conn)

    # -- memory templates ---------------------------------------------------------------

    async def add_template(self, template: Template, machine: str) -> Template:
        """Record a template being made by ``machine``, unless one of the same image and shape
        is recorded already: then that one is returned and nothing is recorded."""
        async with self._write() as conn:
            query = select(_templates.c.template).where(
                _templates.c.image_key == template.image_id,
                _templates.c.cpus == template.cpus,
                _templates.c.memory == template.memory,
                _templates.c.host_id == self.host_id,
            )
            if (row := (await conn.execute(query)).first()) is not None:
                return Template.model_validate(row.template)
            await conn.execute(_templates.insert().values(
                id=template.id, image_key=template.image_id, cpus=template.cpus,
                memory=template.memory, status=template.status.value,
                template=template.model_dump(mode="json"), machine=machine,
                host_id=self.host_id,
            ))  # fmt: skip
        return template

    async def set_template(self, template: Template, machine: str | None = None) -> None:
        """Write ``template``'s new state; ``machine`` is the one still making it, if any."""
        async with self._write() as conn:
            await conn.execute(
                _templates.update()
                .where(_templates.c.id == template.id)
                .values(
                    status=template.status.value,
                    template=template.model_dump(mode="json"),
                    machine=machine,
                )
            )

    async def templates(
        self, image_key: str | None = None
    ) -> builtins.list[tuple[Template, str | None]]:
        """This host's templates (of ``image_key``), oldest first, with the machine making
        it."""
        query = (
            select(_templates.c.template, _templates.c.machine)
            .where(_templates.c.host_id == self.host_id)
            .order_by(_templates.c.seq)
        )
        if image_key is not None:
            query = query.where(_templates.c.image_key == image_key)
        async with self._engine.connect() as conn:
            return [
                (Template.model_validate(row.template), row.machine)
                for row in await conn.execute(query)
            ]

    async def forget_template(self, template_id: str) -> None:
        async with self._write() as conn:
            await conn.execute(_templates.delete().where(_templates.c.id == template_id))

    # -- warm pools ---------------------------------------------------------------------

    async def put_pool(self, pool: Pool) -> bool:
        """Record ``pool``, or replace the one of its name; whether it is new."""
        record = pool.model_dump(mode="json", include=_POOL_FIELDS)
        async with self._write() as conn:
            result = await conn.execute(
                _pools.update().where(_pools.c.name == pool.name).values(pool=record)
            )
            new = result.rowcount == 0
            if new:
                await conn.execute(_pools.insert().values(name=pool.name, pool=record))
            await _pool_event(conn, pool.name, self.host_id)
        return new

    async def pools(self) -> builtins.list[Pool]:
        """Every pool, oldest first, with how many machines this host has ready and filling
        for it."""
        async with self._engine.connect() as conn:
            return await _pools_in(conn, self.host_id)

    async def pool(self, name: str) -> Pool:
        for pool in await self.pools():
            if pool.name == name:
                return pool
        raise PoolNotFound(f"there is no pool {name!r}")

    async def forget_pool(self, name: str) -> None:
        """Forget the pool; its machines are the caller's to destroy and forget."""
        async with self._write() as conn:
            for last in await _pools_in(conn, self.host_id, name):
                await conn.execute(_pools.delete().where(_pools.c.name == name))
                await events.record(conn, EventKind.POOL_DELETED, name, _dump(last))

    async def add_member(
        self,
        pool: str,
        machine: str,
        held: Held,
        check_capacity: Callable[[builtins.list[Held]], None] | None,
    ) -> None:
        """Record a machine that ``pool`` is about to restore, if the host has room for it
        (``check_capacity``, as in ``admit``, in the same transaction)."""
        async with self._write() as conn:
            await _admitting(conn)
            if check_capacity is not None:
                check_capacity(await _holding(conn, self.host_id))
            await conn.execute(_members.insert().values(
                machine=machine, pool=pool, status="filling", cpus=held.cpus,
                memory=held.memory, runtime={}, host_id=self.host_id,
            ))  # fmt: skip
            await _pool_event(conn, pool, self.host_id)

    async def set_member(
        self,
        machine: str,
        status: MemberStatus | None = None,
        runtime: Mapping[str, str] | None = None,
    ) -> None:
        """Change a pooled machine's status or runtime record, unless it was claimed or
        forgotten meanwhile."""
        values: dict[str, Any] = {}
        if status is not None:
            values["status"] = status
        if runtime is not None:
            values["runtime"] = dict(runtime)
        async with self._write() as conn:
            await conn.execute(
                _members.update().where(_members.c.machine == machine).values(values)
            )
            if status is not None and (pool := await _pool_of(conn, machine)) is not None:
                await _pool_event(conn, pool, self.host_id)

    async def members(self, pool: str | None = None) -> builtins.list[Member]:
        """This host's machines of ``pool`` (or of every pool), oldest first."""
        query = select(_members).where(_members.c.host_id == self.host_id).order_by(_members.c.seq)
        if pool is not None:
            query = query.where(_members.c.pool == pool)
        async with self._engine.connect() as conn:
            return [_member(row) for row in await conn.execute(query)]

    async def forget_member(self, machine: str) -> None:
        async with self._write() as conn:
            pool = await _pool_of(conn, machine)
            await conn.execute(_members.delete().where(_members.c.machine == machine))
            if pool is not None:
                await _pool_event(conn, pool, self.host_id)

    async def take_handoffs(self) -> builtins.list[tuple[VM, str]]:
        """The VMs that other hosts placed on this one, with their requests (JSON), taken:
        each is returned once (only this host takes its own, one call at a time). Looking
        writes nothing, and taking wakes no one: it runs at every change."""
        query = select(_handoffs.c.vm_id, _handoffs.c.request).where(
            _handoffs.c.host_id == self.host_id
        )
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        if not rows:
            return []
        taken = [row.vm_id for row in rows]
        async with self._write(announce=False) as conn:
            await conn.execute(_handoffs.delete().where(_handoffs.c.vm_id.in_(taken)))
            vms = select(_vms.c.id, _vms.c.vm).where(_vms.c.id.in_(taken))
            found = {row.id: VM.model_validate(row.vm) for row in await conn.execute(vms)}
        return [(found[row.vm_id], row.request) for row in rows if row.vm_id in found]

    async def deleting(self) -> builtins.list[str]:
        """The IDs of this host's VMs that are ``deleting``."""
        query = select(_vms.c.id).where(
            _vms.c.status == Status.DELETING.value, _vms.c.host_id == self.host_id
        )
        async with self._engine.connect() as conn:
            return [row.id for row in await conn.execute(query.order_by(_vms.c.seq))]

    # -- hosts --------------------------------------------------------------------------

    async def beat(self, host: Mapping[str, Any]) -> None:
        """Record this host as alive now, offering ``host``."""
        values = {"host": dict(host), "heartbeat_at": now_ms()}
        async with self._write(announce=False) as conn:  # no change anyone waits for
            updated = await conn.execute(
                _hosts.update().where(_hosts.c.id == self.host_id).values(values)
            )
            if updated.rowcount == 0:
                await conn.execute(_hosts.insert().values(id=self.host_id, **values))

    async def hosts(self) -> builtins.list[HostRecord]:
        """Every host on this database, by ID."""
        async with self._engine.connect() as conn:
            rows = (await conn.execute(select(_hosts).order_by(_hosts.c.id))).all()
            held = await _holding_by_host(conn, None)
        return [HostRecord(row.id, dict(row.host), row.heartbeat_at, held.get(row.id, []))
                for row in rows]  # fmt: skip

    async def heartbeat_of(self, host_id: str) -> str | None:
        """When the host last said it was alive; ``None`` for a host not on this database."""
        query = select(_hosts.c.heartbeat_at).where(_hosts.c.id == host_id)
        async with self._engine.connect() as conn:
            found: str | None = (await conn.execute(query)).scalar()
            return found

    async def silent_hosts(self, since: str) -> dict[str, str]:
        """The hosts not heard from since ``since``, with their last heartbeat."""
        query = select(_hosts.c.id, _hosts.c.heartbeat_at).where(_hosts.c.heartbeat_at < since)
        async with self._engine.connect() as conn:
            return {row.id: row.heartbeat_at for row in await conn.execute(query)}

    async def forget_host(self, host_id: str, since: str) -> builtins.list[VM]:
        """Forget a host that has been silent since before ``since``: its VMs end in
        ``error`` (``host-lost``), and its pools' machines, templates, cleanups and
        callbacks are forgotten; the VMs it ended are returned. Raises ``HostNotFound``, or
        ``HostUp`` for a host heard from since."""
        async with self._write() as conn:
            query = select(_hosts.c.heartbeat_at).where(_hosts.c.id == host_id).with_for_update()
            if (heartbeat_at := (await conn.execute(query)).scalar()) is None:
                raise HostNotFound(f"there is no host {host_id!r}")
            if heartbeat_at >= since:
                raise HostUp(
                    f"host {host_id} is up (its last heartbeat was at {heartbeat_at}); only a "
                    "lost host can be forgotten"
                )
            lost = ErrorBody(
                code=HostLost.code,
                message=f"its host {host_id} was forgotten (DELETE /hosts) after it was lost; "
                "whatever of this VM was left there is that host's",
            )
            ended = []
            query = select(_vms.c.vm).where(_vms.c.host_id == host_id).with_for_update()
            for row in (await conn.execute(query)).all():
                vm = VM.model_validate(row.vm)
                if vm.status is not Status.ERROR:
                    timeline = [*vm.timeline, TimelineEntry(phase=Phase.ERROR, at=now_ms())]
                    vm = vm.model_copy(
                        update={"status": Status.ERROR, "error": lost, "timeline": timeline}
                    )
                    await _write(conn, vm)
                    ended.append(vm)
            for table in _HOSTS_PARTS:
                await conn.execute(table.delete().where(table.c.host_id == host_id))
            await conn.execute(_hosts.delete().where(_hosts.c.id == host_id))
        return ended

    async def forget(self, vm_id: str, leftover: Leftover | None = None) -> None:
        """Remove the record of a VM that has been destroyed; only a ``deleting`` VM can go.
        ``leftover`` is what its teardown could not remove, recorded in the same
        transaction for reconciliation to retry."""
        async with self._write() as conn:
            last = await _locked(conn, vm_id)  # VMNotFound when it is gone already
            if last.status is not Status.DELETING:
                raise StateConflict(f"VM {vm_id} is not deleting; it is kept")
            await conn.execute(_vms.delete().where(_vms.c.id == vm_id))
            await conn.execute(_handoffs.delete().where(_handoffs.c.vm_id == vm_id))
            await events.record(conn, EventKind.VM_DELETED, vm_id, _dump(last))
            if leftover is not None:
                await _insert_leftover(conn, leftover, self.host_id)

    async def keep_leftover(self, leftover: Leftover) -> None:
        """Record what a teardown could not remove, for reconciliation to retry."""
        async with self._write() as conn:
            await _insert_leftover(conn, leftover, self.host_id)

    async def leftovers(self) -> tuple[Leftover, ...]:
        """What this host's teardowns could not remove, oldest first."""
        query = select(_cleanups).where(_cleanups.c.host_id == self.host_id)
        async with self._engine.connect() as conn:
            rows = await conn.execute(query.order_by(_cleanups.c.seq))
            return tuple(
                Leftover(
                    row.vm_id, row.machine, dict(row.runtime), row.reason, row.attempts, row.seq
                )
                for row in rows
            )

    async def leftover_done(self, leftover: Leftover, failure: str | None) -> None:
        """Forget ``leftover``, removed at last; or, with the ``failure`` of this attempt,
        count the attempt."""
        async with self._write() as conn:
            where = _cleanups.c.seq == leftover.seq
            if failure is None:
                await conn.execute(_cleanups.delete().where(where))
            else:
                await conn.execute(
                    _cleanups.update()
                    .where(where)
                    .values(reason=failure, attempts=_cleanups.c.attempts + 1)
                )


async def _insert_leftover(conn: AsyncConnection, leftover: Leftover, host_id: str) -> None:
    await conn.execute(
        _cleanups.insert().values(
            vm_id=leftover.vm_id, machine=leftover.machine, runtime=leftover.runtime,
            reason=leftover.reason, attempts=leftover.attempts, host_id=host_id,
        )
    )  # fmt: skip


async def _locked(conn: AsyncConnection, vm_id: str) -> VM:
    query = select(_vms.c.vm).where(_vms.c.id == vm_id).with_for_update()
    row = (await conn.execute(query)).first()
    if row is None:
        raise VMNotFound()
    return VM.model_validate(row.vm)


async def _write(conn: AsyncConnection, vm: VM) -> None:
    await conn.execute(
        _vms.update()
        .where(_vms.c.id == vm.id)
        .values(status=vm.status.value, vm=_dump(vm), expires_at=vm.expires_at)
    )
    await events.record(conn, EventKind.VM, vm.id, _dump(vm))


async def _find_by_key(conn: AsyncConnection, key: str) -> Earlier | None:
    query = select(_vms.c.vm, _vms.c.request_digest).where(_vms.c.idempotency_key == key)
    row = (await conn.execute(query)).first()
    return None if row is None else Earlier(VM.model_validate(row.vm), row.request_digest)


async def _check_name_free(conn: AsyncConnection, name: str | None) -> None:
    if name is None:
        return
    row = (await conn.execute(select(_vms.c.id).where(_vms.c.name == name))).first()
    if row is not None:
        raise NameConflict(f"VM {row.id} is already named {name!r}; delete it or choose another")


_ADMISSION_LOCK = 0x676F6C64  # "gold": the key of the advisory lock that admissions take
_MIGRATION_LOCK = 0x676F6D69  # "gomi": the one that migrations take


async def _admitting(conn: AsyncConnection) -> None:
    """Queue this transaction behind any other that admits a VM or a pool's machine to any
    host, until it ends. SQLite has one writer at a time already; PostgreSQL's concurrent
    transactions would each see a host's last place free (its default isolation reads what
    is committed), so they take a transaction-scoped advisory lock. One for the whole fleet:
    a placement reads every host, and an admission holds it for milliseconds."""
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADMISSION_LOCK})


async def _candidates(
    conn: AsyncConnection, placing: Placing, pools: Sequence[str]
) -> list[Candidate]:
    """The hosts that are up, as ``Placing`` and ``Candidate`` say, by ID."""
    query = select(_hosts).where(_hosts.c.heartbeat_at >= placing.since).order_by(_hosts.c.id)
    hosts = (await conn.execute(query)).all()
    held = await _holding_by_host(conn, None)
    pooled: set[str] = set()
    if pools:
        query = select(_members.c.host_id).where(
            _members.c.pool.in_(pools), _members.c.status == "ready"
        )
        pooled = {row.host_id for row in await conn.execute(query)}
    query = select(_templates.c.host_id, _templates.c.image_key).where(
        _templates.c.status == TemplateStatus.READY.value,
        _templates.c.cpus == placing.cpus,
        _templates.c.memory == placing.memory,
    )
    templates = {(row.host_id, row.image_key) for row in await conn.execute(query)}
    found = []
    for row in hosts:
        images: dict[str, list[str]] = row.host.get("images", {})
        gold = next((g for g, names in images.items() if placing.image_key in names), None)
        found.append(Candidate(
            row.id, dict(row.host), held.get(row.id, []), row.id in pooled, gold is not None,
            (row.id, gold) in templates,
        ))  # fmt: skip
    return found


async def _holding(conn: AsyncConnection, host_id: str) -> list[Held]:
    return (await _holding_by_host(conn, host_id)).get(host_id, [])


async def _holding_by_host(conn: AsyncConnection, host_id: str | None) -> dict[str, list[Held]]:
    """What each host's VMs and pools' machines hold (only ``host_id``'s, if given)."""
    vms = select(_vms.c.host_id, _vms.c.vm).where(_vms.c.status.in_([s.value for s in HOLDING]))
    members = select(_members.c.host_id, _members.c.cpus, _members.c.memory)
    if host_id is not None:
        vms, members = (
            vms.where(_vms.c.host_id == host_id),
            members.where(_members.c.host_id == host_id),
        )
    held: dict[str, list[Held]] = {}
    for row in await conn.execute(vms):
        vm = VM.model_validate(row.vm)
        held.setdefault(row.host_id, []).append(Held(vm.cpus, vm.memory, vm.network_group))
    for member in await conn.execute(members):
        held.setdefault(member.host_id, []).append(Held(member.cpus, member.memory))
    return held


async def _claim(conn: AsyncConnection, pools: Sequence[str], host_id: str) -> Member | None:
    """Take the oldest ready machine of ``pools`` on ``host_id`` out of its pool, and count
    the claim."""
    if not pools:
        return None
    query = (
        select(_members)
        .where(
            _members.c.pool.in_(pools),
            _members.c.status == "ready",
            _members.c.host_id == host_id,
        )
        .order_by(_members.c.seq)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    if (row := (await conn.execute(query)).first()) is None:
        return None
    await conn.execute(_members.delete().where(_members.c.seq == row.seq))
    found = (await conn.execute(select(_pools.c.pool).where(_pools.c.name == row.pool))).first()
    if found is not None:
        record = {**found.pool, "claimed": found.pool.get("claimed", 0) + 1}
        await conn.execute(_pools.update().where(_pools.c.name == row.pool).values(pool=record))
    return _member(row)


async def _pools_in(conn: AsyncConnection, host_id: str, name: str | None = None) -> list[Pool]:
    """Every pool (or the one named ``name``), oldest first, with the machines that
    ``host_id`` keeps for it counted."""
    pools = select(_pools.c.pool).order_by(_pools.c.seq)
    members = select(_members).where(_members.c.host_id == host_id)
    if name is not None:
        pools, members = pools.where(_pools.c.name == name), members.where(_members.c.pool == name)
    found = [Pool.model_validate(row.pool) for row in await conn.execute(pools)]
    counts = Counter((row.pool, row.status) for row in await conn.execute(members))
    return [_counted(pool, counts[pool.name, "ready"], counts[pool.name, "filling"])
            for pool in found]  # fmt: skip


async def _pool_of(conn: AsyncConnection, machine: str) -> str | None:
    query = select(_members.c.pool).where(_members.c.machine == machine)
    return (await conn.execute(query)).scalar()


async def _pool_event(conn: AsyncConnection, name: str, host_id: str) -> None:
    for pool in await _pools_in(conn, host_id, name):
        await events.record(conn, EventKind.POOL, name, _dump(pool))


def _counted(pool: Pool, ready: int, filling: int) -> Pool:
    status = PoolStatus.READY if ready >= pool.size else PoolStatus.FILLING
    status = PoolStatus.ERROR if pool.error is not None else status
    return pool.model_copy(update={"ready": ready, "filling": filling, "status": status})


def _delivery(row: Any) -> Delivery:
    return Delivery(row.message_id, row.vm_id, row.url, row.body, row.attempts, row.next_at)


def _member(row: Any) -> Member:
    return Member(row.machine, row.pool, row.status, dict(row.runtime))


_POOL_FIELDS = {"name", "image", "cpus", "memory", "network_type", "size", "claimed", "error",
                "created_at"}  # fmt: skip
"""What the ``pools`` table keeps of a pool; the counts of machines are read from theirs."""


def _sqlite_for_concurrency(connection: Any, _: object) -> None:
    """Write-ahead logging lets readers and a writer work at once; in the default journal,
    each waits out the other in SQLite's busy handler, which tripled the POST latency while
    VMs booted (bench/RESULTS.md, d). ``synchronous=NORMAL`` is safe against a crash of the
    service; only an OS crash can lose the last commits. Transactions are begun by
    ``_sqlite_begin`` rather than by the driver's own guesswork."""
    connection.isolation_level = None
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def _sqlite_begin(conn: Any) -> None:
    """A write transaction takes SQLite's write lock when it begins (``BEGIN IMMEDIATE``), so
    what it reads cannot change before it writes; a read-only one does not block writers."""
    immediate = conn.get_execution_options().get("goldclone_write", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _dump(record: VM | Pool) -> dict[str, Any]:
    return record.model_dump(mode="json")
