"""Callbacks still to deliver, each host's own."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from goldclone.store.tables import deliveries as _deliveries


@dataclass(frozen=True)
class Delivery:
    """A callback still to deliver: the VM as it was when it was told, and the attempts so
    far."""

    message_id: str
    vm_id: str
    url: str
    body: str
    attempts: int
    next_at: datetime


async def add(conn: AsyncConnection, host_id: str, delivery: Delivery) -> None:
    await conn.execute(_deliveries.insert().values(
        message_id=delivery.message_id, vm_id=delivery.vm_id, url=delivery.url,
        body=delivery.body, attempts=delivery.attempts, next_at=delivery.next_at,
        host_id=host_id,
    ))  # fmt: skip


async def due(conn: AsyncConnection, host_id: str, now: datetime, limit: int) -> list[Delivery]:
    """``host_id``'s deliveries whose next attempt is due at ``now``, the earliest first."""
    query = (
        select(_deliveries)
        .where(_deliveries.c.next_at <= now, _deliveries.c.host_id == host_id)
        .order_by(_deliveries.c.next_at)
        .limit(limit)
    )
    return [_delivery(row) for row in await conn.execute(query)]


async def next_at(conn: AsyncConnection, host_id: str) -> datetime | None:
    """When ``host_id``'s next delivery is due; ``None`` without one."""
    query = select(func.min(_deliveries.c.next_at)).where(_deliveries.c.host_id == host_id)
    found: datetime | None = (await conn.execute(query)).scalar()
    return found


async def tried(conn: AsyncConnection, message_id: str, next_at: datetime | None) -> None:
    """Count an attempt of the delivery, due again at ``next_at``; without one, it is over
    and forgotten."""
    where = _deliveries.c.message_id == message_id
    if next_at is None:
        await conn.execute(_deliveries.delete().where(where))
    else:
        await conn.execute(_deliveries.update().where(where).values(
            attempts=_deliveries.c.attempts + 1, next_at=next_at
        ))  # fmt: skip


def _delivery(row: Any) -> Delivery:
    return Delivery(row.message_id, row.vm_id, row.url, row.body, row.attempts, row.next_at)
