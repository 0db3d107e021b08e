"""The hosts that share a database: what each offers, its heartbeat, and what its VMs and its
pools' machines hold of it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from goldclone.clock import now, rfc3339_ms
from goldclone.egress import tenant_group
from goldclone.errors import HostLost, HostNotFound, HostUp
from goldclone.models import VM, ErrorBody, Phase, Status, TimelineEntry
from goldclone.shape import Shape
from goldclone.store import pool_records, template_records, vm_records
from goldclone.store.tables import cleanups as _cleanups
from goldclone.store.tables import deliveries as _deliveries
from goldclone.store.tables import handoffs as _handoffs
from goldclone.store.tables import hosts as _hosts
from goldclone.store.tables import pool_members as _members
from goldclone.store.tables import templates as _templates
from goldclone.store.tables import vms as _vms

_HOSTS_PARTS = (_cleanups, _templates, _members, _deliveries, _handoffs)
"""What stands for one host's machines and files, besides its VMs."""
_ADMISSION_LOCK = 0x676F6C64  # "gold": the key of the advisory lock that admissions take


class Held(NamedTuple):
    """What one VM or pooled machine holds of the host, and the network group it is in (as
    ``tenant_group`` names it)."""

    cpus: int
    memory: int
    group: str | None = None


@dataclass(frozen=True)
class HostRecord:
    """A host on the database: what it offers (``host``), its last heartbeat, and what its
    VMs and pools' machines hold."""

    id: str
    host: dict[str, Any]
    heartbeat_at: datetime
    held: list[Held]


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


async def lock_admissions(conn: AsyncConnection) -> None:
    """Queue this transaction behind any other that admits a VM or a pool's machine to any
    host, until it ends. SQLite has one writer at a time already; PostgreSQL's concurrent
    transactions would each see a host's last place free (its default isolation reads what
    is committed), so they take a transaction-scoped advisory lock. One for the whole fleet:
    a placement reads every host, and an admission holds it for milliseconds."""
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADMISSION_LOCK})


async def beat(conn: AsyncConnection, host_id: str, host: Mapping[str, Any]) -> None:
    """Record ``host_id`` as alive now, offering ``host``."""
    values = {"host": dict(host), "heartbeat_at": now()}
    updated = await conn.execute(_hosts.update().where(_hosts.c.id == host_id).values(values))
    if updated.rowcount == 0:
        await conn.execute(_hosts.insert().values(id=host_id, **values))


async def every(conn: AsyncConnection) -> list[HostRecord]:
    """Every host on the database, by ID."""
    rows = (await conn.execute(select(_hosts).order_by(_hosts.c.id))).all()
    held = await holding(conn)
    return [HostRecord(row.id, dict(row.host), row.heartbeat_at, held.get(row.id, []))
            for row in rows]  # fmt: skip


async def offer_of(conn: AsyncConnection, host_id: str) -> dict[str, Any] | None:
    """What the host offered at its last heartbeat; ``None`` for a host not on the database."""
    found = (await conn.execute(select(_hosts.c.host).where(_hosts.c.id == host_id))).scalar()
    return None if found is None else dict(found)


async def heartbeat_of(conn: AsyncConnection, host_id: str) -> datetime | None:
    """When the host last said it was alive; ``None`` for a host not on the database."""
    query = select(_hosts.c.heartbeat_at).where(_hosts.c.id == host_id)
    found: datetime | None = (await conn.execute(query)).scalar()
    return found


async def silent(conn: AsyncConnection, since: datetime) -> dict[str, datetime]:
    """The hosts not heard from since ``since``, with their last heartbeat."""
    query = select(_hosts.c.id, _hosts.c.heartbeat_at).where(_hosts.c.heartbeat_at < since)
    return {row.id: row.heartbeat_at for row in await conn.execute(query)}


async def holding(conn: AsyncConnection, host_id: str | None = None) -> dict[str, list[Held]]:
    """What each host's VMs and pools' machines hold (only ``host_id``'s, if given)."""
    statuses = [s.value for s in vm_records.HOLDING]
    vms = select(_vms.c.host_id, _vms.c.vm).where(_vms.c.status.in_(statuses))
    members = select(_members.c.host_id, _members.c.cpus, _members.c.memory)
    if host_id is not None:
        vms, members = (
            vms.where(_vms.c.host_id == host_id),
            members.where(_members.c.host_id == host_id),
        )
    held: dict[str, list[Held]] = {}
    for row in await conn.execute(vms):
        vm = VM.model_validate(row.vm)
        group = tenant_group(vm.tenant, vm.network_group)
        held.setdefault(row.host_id, []).append(Held(vm.cpus, vm.memory, group))
    for member in await conn.execute(members):
        held.setdefault(member.host_id, []).append(Held(member.cpus, member.memory))
    return held


async def held_by(conn: AsyncConnection, host_id: str) -> list[Held]:
    """What holds ``host_id``'s resources now: VMs and the machines of warm pools."""
    return (await holding(conn, host_id)).get(host_id, [])


async def candidates(
    conn: AsyncConnection,
    since: datetime,
    image_key: str,
    shape: Shape,
    pools: Sequence[str],
) -> list[Candidate]:
    """The hosts heard from since ``since``, by ID, as candidates for a VM of ``image_key``
    (its key as the request names it) in this shape, which may claim from ``pools``."""
    query = select(_hosts).where(_hosts.c.heartbeat_at >= since).order_by(_hosts.c.id)
    hosts = (await conn.execute(query)).all()
    held = await holding(conn)
    pooled = await pool_records.hosts_with_ready(conn, pools)
    templates = await template_records.ready_in_shape(conn, shape)
    found = []
    for row in hosts:
        images: dict[str, list[str]] = row.host.get("images", {})
        gold = next((g for g, names in images.items() if image_key in names), None)
        found.append(Candidate(
            row.id, dict(row.host), held.get(row.id, []), row.id in pooled, gold is not None,
            (row.id, gold) in templates,
        ))  # fmt: skip
    return found


async def machines(conn: AsyncConnection, host_id: str) -> set[str]:
    """The names of the machines of ``host_id``'s VMs, of its templates being made and of
    every machine that it keeps for a pool."""
    return (
        await vm_records.machines(conn, host_id)
        | await template_records.machines(conn, host_id)
        | await pool_records.machines(conn, host_id)
    )


async def forget(conn: AsyncConnection, host_id: str, since: datetime) -> list[VM]:
    """Forget a host that has been silent since before ``since``: its VMs end in ``error``
    (``host-lost``), and its pools' machines, templates, cleanups and callbacks are
    forgotten; the VMs it ended are returned. Raises ``HostNotFound``, or ``HostUp`` for a
    host heard from since."""
    query = select(_hosts.c.heartbeat_at).where(_hosts.c.id == host_id).with_for_update()
    if (heartbeat_at := (await conn.execute(query)).scalar()) is None:
        raise HostNotFound(f"there is no host {host_id!r}", host=host_id)
    if heartbeat_at >= since:
        raise HostUp(
            f"host {host_id} is up (its last heartbeat was at {rfc3339_ms(heartbeat_at)}); only "
            "a lost host can be forgotten",
            host=host_id,
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
            timeline = [*vm.timeline, TimelineEntry(phase=Phase.ERROR, at=now())]
            vm = vm.model_copy(update={"status": Status.ERROR, "error": lost, "timeline": timeline})
            await vm_records.write(conn, vm)
            ended.append(vm)
    for table in _HOSTS_PARTS:
        await conn.execute(table.delete().where(table.c.host_id == host_id))
    await conn.execute(_hosts.delete().where(_hosts.c.id == host_id))
    return ended


async def adopt_unowned(conn: AsyncConnection, host_id: str) -> None:
    """Make ``host_id``'s what was recorded before hosts existed (revision 0008), by the one
    host there was."""
    query = select(_vms.c.id, _vms.c.vm).where(_vms.c.host_id.is_(None))
    for row in (await conn.execute(query)).all():
        vm = {**row.vm, "host": host_id}
        await conn.execute(_vms.update().where(_vms.c.id == row.id).values(vm=vm, host_id=host_id))
    for table in _HOSTS_PARTS:
        await conn.execute(table.update().where(table.c.host_id.is_(None)).values(host_id=host_id))
