"""VM records and their state machine. A VM is stored as its API object (JSON) plus its
driver's runtime record, which only the driver reads; each change of its state checks, under
the row's write lock, that the VM is in a state the change expects (``TRANSITIONS``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from goldclone.clock import now
from goldclone.errors import NameConflict, StateConflict, VMNotFound
from goldclone.models import VM, Phase, Status, TimelineEntry
from goldclone.store import event_log
from goldclone.store.database import note_phase
from goldclone.store.event_log import EventKind
from goldclone.store.tables import console_tails as _tails
from goldclone.store.tables import vms as _vms

HOLDING = (Status.CREATING, Status.RUNNING, Status.DELETING)
"""The VMs that count against their host's totals: they hold, or are about to hold, its CPUs
and memory."""
LIVE = tuple(status for status in Status if status is not Status.DELETING)
"""The VMs that a change (a renewal, an expiry) may still reach."""
MATCHES_SHOWN = 10
"""How many of the VMs that an ambiguous reference matches its error lists."""

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
class Earlier:
    """The VM that an earlier request with the same idempotency key made, and the digest of
    that request's body."""

    vm: VM
    digest: str


async def add(
    conn: AsyncConnection,
    vm: VM,
    runtime: Mapping[str, str],
    idempotency: tuple[str, str] | None = None,
) -> None:
    """Record the new ``vm`` (on its ``host``), with the key and body digest of the request
    that made it."""
    key, digest = idempotency or (None, None)
    await conn.execute(
        _vms.insert().values(
            id=vm.id, status=vm.status.value, vm=dump(vm), runtime=dict(runtime),
            host_id=vm.host, idempotency_key=key, request_digest=digest, name=vm.name,
            expires_at=vm.expires_at, tenant=vm.tenant,
        )
    )  # fmt: skip
    await event_log.record(conn, EventKind.VM, vm.id, dump(vm))


async def change(
    conn: AsyncConnection,
    vm_id: str,
    expect: Status | tuple[Status, ...],
    phase: Phase | None = None,
    status: Status | None = None,
    **fields: Any,
) -> VM:
    """Add ``phase`` to the VM's timeline (without one, only ``fields`` change: its labels,
    its lease), set ``status`` (by default, it keeps its own) and ``fields``, if the VM's
    status is ``expect`` now; return it changed.

    Raises ``VMNotFound`` if it is gone and ``StateConflict`` if it is in another state, or
    if the change is not one that ``TRANSITIONS`` allows.
    """
    expected = (expect,) if isinstance(expect, Status) else expect
    current = await locked(conn, vm_id)
    target = status or current.status
    allowed = phase is None or target in TRANSITIONS[current.status]
    if current.status not in expected or not allowed:
        what = "this change" if phase is None else phase.value
        raise StateConflict(
            f"VM {vm_id} is {current.status.value}; {what} needs it "
            f"{' or '.join(s.value for s in expected)}",
            vm=vm_id,
        )
    timeline = current.timeline
    if phase is not None:
        timeline = [*timeline, TimelineEntry(phase=phase, at=now())]
    vm = current.model_copy(update={**fields, "status": target, "timeline": timeline})
    await write(conn, vm)
    if phase is not None:
        note_phase(conn, vm)
    return vm


async def put_back(conn: AsyncConnection, vm: VM) -> None:
    """Put back ``vm`` as it was before a DELETE that the hypervisor refused, if the VM is
    still ``deleting``."""
    current = await locked(conn, vm.id)
    if current.status is not Status.DELETING:
        raise StateConflict(f"VM {vm.id} is {current.status.value}, not deleting", vm=vm.id)
    await write(conn, vm)


async def remove(conn: AsyncConnection, vm_id: str) -> None:
    """Remove the record of a VM that has been destroyed; only a ``deleting`` VM can go."""
    last = await locked(conn, vm_id)  # VMNotFound when it is gone already
    if last.status is not Status.DELETING:
        raise StateConflict(f"VM {vm_id} is not deleting; it is kept", vm=vm_id)
    await conn.execute(_vms.delete().where(_vms.c.id == vm_id))
    await conn.execute(_tails.delete().where(_tails.c.vm_id == vm_id))
    await event_log.record(conn, EventKind.VM_DELETED, vm_id, dump(last))


async def set_runtime(conn: AsyncConnection, vm_id: str, record: Mapping[str, str]) -> None:
    """Record the driver's runtime of the VM's machine."""
    event_log.touched(conn, vm_id)
    result = await conn.execute(
        _vms.update().where(_vms.c.id == vm_id).values(runtime=dict(record))
    )
    if result.rowcount == 0:
        raise VMNotFound(vm=vm_id)


async def keep_console(conn: AsyncConnection, vm_id: str, text: str) -> None:
    """Keep ``text``, the end of the VM's console, until the VM is removed."""
    await conn.execute(_tails.delete().where(_tails.c.vm_id == vm_id))
    await conn.execute(_tails.insert().values(vm_id=vm_id, text=text))


async def console(conn: AsyncConnection, vm_id: str) -> str | None:
    """The end of the VM's console kept by ``keep_console``, if any."""
    query = select(_tails.c.text).where(_tails.c.vm_id == vm_id)
    found: str | None = (await conn.execute(query)).scalar()
    return found


async def get(conn: AsyncConnection, vm_id: str) -> VM:
    row = (await conn.execute(select(_vms.c.vm).where(_vms.c.id == vm_id))).first()
    if row is None:
        raise VMNotFound(vm=vm_id)
    return VM.model_validate(row.vm)


async def matching(conn: AsyncConnection, ref: str, tenant: str | None) -> list[tuple[str, str]]:
    """The IDs and names of ``tenant``'s VMs (every tenant's, with ``None``) that ``ref``
    names: the one with that ID; else those of that name; else those whose ID begins with
    it. At most ``MATCHES_SHOWN`` + 1, the oldest first."""
    query = select(_vms.c.id, _vms.c.name).order_by(_vms.c.seq).limit(MATCHES_SHOWN + 1)
    if tenant is not None:
        query = query.where(_vms.c.tenant == tenant)
    for where in (_vms.c.id == ref, _vms.c.name == ref, _vms.c.id.startswith(ref, autoescape=True)):
        if found := [(row.id, row.name or "") for row in await conn.execute(query.where(where))]:
            return found
    return []


async def runtime(conn: AsyncConnection, vm_id: str) -> dict[str, str]:
    """The runtime record of the VM's machine; empty until the driver has made one."""
    row = (await conn.execute(select(_vms.c.runtime).where(_vms.c.id == vm_id))).first()
    if row is None:
        raise VMNotFound(vm=vm_id)
    return dict(row.runtime)


async def of_host(conn: AsyncConnection, host_id: str | None) -> list[VM]:
    """``host_id``'s VMs (every host's, with ``None``), in the order they were accepted."""
    query = select(_vms.c.vm).order_by(_vms.c.seq)
    if host_id is not None:
        query = query.where(_vms.c.host_id == host_id)
    return [VM.model_validate(row.vm) for row in await conn.execute(query)]


async def expired(conn: AsyncConnection, host_id: str, moment: datetime) -> list[str]:
    """The IDs of ``host_id``'s VMs whose lease ended at ``moment`` or before, but not deleting
    yet."""
    query = select(_vms.c.id).where(
        _vms.c.expires_at <= moment,
        _vms.c.status != Status.DELETING.value,
        _vms.c.host_id == host_id,
    )
    return [row.id for row in await conn.execute(query.order_by(_vms.c.expires_at))]


async def deleting(conn: AsyncConnection, host_id: str) -> list[str]:
    """The IDs of ``host_id``'s VMs that are ``deleting``."""
    query = select(_vms.c.id).where(
        _vms.c.status == Status.DELETING.value, _vms.c.host_id == host_id
    )
    return [row.id for row in await conn.execute(query.order_by(_vms.c.seq))]


async def machines(conn: AsyncConnection, host_id: str) -> set[str]:
    """The names of the machines of ``host_id``'s VMs: the one in its runtime record, or the
    VM's ID while it has none."""
    query = select(_vms.c.id, _vms.c.runtime).where(_vms.c.host_id == host_id)
    return {row.runtime.get("machine", row.id) for row in await conn.execute(query)}


async def find_by_key(conn: AsyncConnection, tenant: str, key: str) -> Earlier | None:
    """The VM that ``tenant``'s request with idempotency key ``key`` made, if one did."""
    query = select(_vms.c.vm, _vms.c.request_digest).where(
        _vms.c.tenant == tenant, _vms.c.idempotency_key == key
    )
    row = (await conn.execute(query)).first()
    return None if row is None else Earlier(VM.model_validate(row.vm), row.request_digest)


async def check_name_free(conn: AsyncConnection, tenant: str, name: str | None) -> None:
    """Raise ``NameConflict`` if a recorded VM of ``tenant`` is named ``name``."""
    if name is None:
        return
    query = select(_vms.c.id).where(_vms.c.tenant == tenant, _vms.c.name == name)
    row = (await conn.execute(query)).first()
    if row is not None:
        raise NameConflict(f"VM {row.id} is already named {name!r}; delete it or choose another")


async def locked(conn: AsyncConnection, vm_id: str) -> VM:
    """The VM, its row locked for the rest of ``conn``'s transaction."""
    query = select(_vms.c.vm).where(_vms.c.id == vm_id).with_for_update()
    row = (await conn.execute(query)).first()
    if row is None:
        raise VMNotFound(vm=vm_id)
    return VM.model_validate(row.vm)


async def write(conn: AsyncConnection, vm: VM) -> None:
    """Write ``vm`` over its record, and log the change."""
    await conn.execute(
        _vms.update()
        .where(_vms.c.id == vm.id)
        .values(status=vm.status.value, vm=dump(vm), expires_at=vm.expires_at)
    )
    await event_log.record(conn, EventKind.VM, vm.id, dump(vm))


def dump(vm: VM) -> dict[str, Any]:
    return vm.model_dump(mode="json")
