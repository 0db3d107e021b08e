"""Warm pools and the machines that each host keeps for them (its members): a pool is one
record for the whole fleet; its counts of ready and filling machines are read from the
members of the host that asks."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from goldclone.errors import PoolNotFound
from goldclone.models import Pool, PoolStatus
from goldclone.store import event_log
from goldclone.store.event_log import EventKind
from goldclone.store.tables import pool_members as _members
from goldclone.store.tables import pools as _pools

MemberStatus = Literal["filling", "ready"]

_POOL_FIELDS = {"name", "image", "cpus", "memory", "disk_size", "network_type", "size", "claimed",
                "error", "created_at"}  # fmt: skip
"""What the ``pools`` table keeps of a pool; the counts of machines are read from theirs."""


@dataclass(frozen=True)
class Member:
    """A machine that a warm pool keeps: being restored (``filling``), or ``ready`` to be
    claimed; with its driver's runtime record once it has one."""

    machine: str
    pool: str
    status: MemberStatus
    runtime: dict[str, str]


async def put(conn: AsyncConnection, pool: Pool, host_id: str) -> bool:
    """Record ``pool``, or replace the one of its name; whether it is new."""
    record = pool.model_dump(mode="json", include=_POOL_FIELDS)
    result = await conn.execute(
        _pools.update().where(_pools.c.name == pool.name).values(pool=record)
    )
    new = result.rowcount == 0
    if new:
        await conn.execute(_pools.insert().values(name=pool.name, pool=record))
    event_log.touched(conn, event_log.POOLS)  # a definition: every host follows it
    await announce(conn, pool.name, host_id)
    return new


async def counted(conn: AsyncConnection, host_id: str, name: str | None = None) -> list[Pool]:
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


async def one(conn: AsyncConnection, host_id: str, name: str) -> Pool:
    """The pool named ``name``, counted as ``counted`` does; raises ``PoolNotFound``."""
    for pool in await counted(conn, host_id, name):
        return pool
    raise PoolNotFound(f"there is no pool {name!r}", pool=name)


async def forget(conn: AsyncConnection, host_id: str, name: str) -> None:
    """Forget the pool; its machines are the caller's to destroy and forget."""
    for last in await counted(conn, host_id, name):
        await conn.execute(_pools.delete().where(_pools.c.name == name))
        event_log.touched(conn, event_log.POOLS)
        await event_log.record(conn, EventKind.POOL_DELETED, name, last.model_dump(mode="json"))


async def add_member(
    conn: AsyncConnection, host_id: str, pool: str, machine: str, cpus: int, memory: int
) -> None:
    """Record a machine that ``pool`` is about to restore on ``host_id``."""
    await conn.execute(_members.insert().values(
        machine=machine, pool=pool, status="filling", cpus=cpus, memory=memory, runtime={},
        host_id=host_id,
    ))  # fmt: skip
    await announce(conn, pool, host_id)


async def set_member(
    conn: AsyncConnection,
    host_id: str,
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
    await conn.execute(_members.update().where(_members.c.machine == machine).values(values))
    if status is not None and (pool := await _pool_of(conn, machine)) is not None:
        await announce(conn, pool, host_id)


async def members(conn: AsyncConnection, host_id: str, pool: str | None = None) -> list[Member]:
    """``host_id``'s machines of ``pool`` (or of every pool), oldest first."""
    query = select(_members).where(_members.c.host_id == host_id).order_by(_members.c.seq)
    if pool is not None:
        query = query.where(_members.c.pool == pool)
    return [_member(row) for row in await conn.execute(query)]


async def forget_member(conn: AsyncConnection, host_id: str, machine: str) -> None:
    pool = await _pool_of(conn, machine)
    await conn.execute(_members.delete().where(_members.c.machine == machine))
    if pool is not None:
        await announce(conn, pool, host_id)


async def claim(conn: AsyncConnection, pools: Sequence[str], host_id: str) -> Member | None:
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
    await announce(conn, row.pool, host_id)
    return _member(row)


async def hosts_with_ready(conn: AsyncConnection, pools: Sequence[str]) -> set[str]:
    """The hosts that keep a ready machine of one of ``pools``."""
    if not pools:
        return set()
    query = select(_members.c.host_id).where(
        _members.c.pool.in_(pools), _members.c.status == "ready"
    )
    return {row.host_id for row in await conn.execute(query)}


async def machines(conn: AsyncConnection, host_id: str) -> set[str]:
    """The machines that ``host_id`` keeps for pools."""
    query = select(_members.c.machine).where(_members.c.host_id == host_id)
    return {row.machine for row in await conn.execute(query)}


async def announce(conn: AsyncConnection, name: str, host_id: str) -> None:
    """Log the pool named ``name`` as it is now, with ``host_id``'s machines counted."""
    for pool in await counted(conn, host_id, name):
        await event_log.record(conn, EventKind.POOL, name, pool.model_dump(mode="json"))


async def _pool_of(conn: AsyncConnection, machine: str) -> str | None:
    query = select(_members.c.pool).where(_members.c.machine == machine)
    return (await conn.execute(query)).scalar()


def _counted(pool: Pool, ready: int, filling: int) -> Pool:
    status = PoolStatus.READY if ready >= pool.size else PoolStatus.FILLING
    status = PoolStatus.ERROR if pool.error is not None else status
    return pool.model_copy(update={"ready": ready, "filling": filling, "status": status})


def _member(row: Any) -> Member:
    return Member(row.machine, row.pool, row.status, dict(row.runtime))
