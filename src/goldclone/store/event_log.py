"""The change log: every change of a VM, pool or image, written to the ``events`` table in
the transaction that makes it, so the log misses nothing that was committed and survives
restarts (and, on a shared database, every host sees every host's changes). Each event's
``id`` is its row's sequence number, so IDs only grow, and grow in commit order: a
transaction's events are written last in it (``write_pending``), on PostgreSQL after the
events of every other transaction have committed, so that a reader that asks for what follows
the last ID it saw never skips an event that committed later with a smaller ID. The table
keeps about the last ``WINDOW`` (``trim``, with each heartbeat)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from pydantic import BaseModel
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from goldclone.clock import Moment, now
from goldclone.store.tables import events as _events

WINDOW = 10_000
"""Events kept; a client that comes back after more than that many is told with ``dropped``."""
CHANNEL = "goldclone_changes"
"""The PostgreSQL notification channel that every event is announced on, at its commit."""
_TOUCHED = "goldclone_touched"
"""The key, in a connection's ``info``, of the subjects its transaction has changed."""
_PENDING = "goldclone_events"
"""The key, in a connection's ``info``, of the events its transaction has recorded."""
_EVENTS_LOCK = 0x676F6576  # "goev": the key of the lock held from writing events to commit
POOLS = "pools"
"""The subject of a change of a pool's definition, which every host follows."""
_MAX_PAYLOAD = 7900
"""PostgreSQL's limit for a notification's payload is 8000 bytes; a longer list of subjects is
sent as none (every listener wakes)."""


class EventKind(StrEnum):
    VM = "vm"
    VM_DELETED = "vm.deleted"
    IMAGE = "image"
    IMAGE_DELETED = "image.deleted"
    POOL = "pool"
    POOL_DELETED = "pool.deleted"
    DROPPED = "dropped"


class Event(BaseModel):
    """One change: ``data`` is the VM, image or pool object as the change left it (for a
    ``*.deleted`` event, as it last was)."""

    id: int
    kind: EventKind
    subject: str
    at: Moment
    data: dict[str, Any]


async def record(
    conn: AsyncConnection, kind: EventKind, subject: str, data: Mapping[str, Any]
) -> None:
    """Add an event to ``conn``'s transaction, written at its end (``write_pending``)."""
    touched(conn, subject)
    if kind in (EventKind.VM, EventKind.VM_DELETED) and data.get("host"):
        touched(conn, host_subject(str(data["host"])))
    event = {"kind": kind.value, "subject": subject, "data": dict(data), "at": now()}
    conn.info.setdefault(_PENDING, []).append(event)


async def write_pending(conn: AsyncConnection) -> None:
    """Write the events that ``conn``'s transaction recorded, as the last thing it does before
    it commits. On PostgreSQL, a lock held to the commit makes transactions draw their events'
    IDs one after another, each once the one before has committed; it is taken after every
    row lock of the transaction, so it never waits in a cycle with one."""
    pending: list[dict[str, Any]] = conn.info.pop(_PENDING, [])
    if not pending:
        return
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _EVENTS_LOCK})
    await conn.execute(_events.insert(), pending)
    if conn.dialect.name == "postgresql":  # sent at commit, to every listening service
        subjects = json.dumps(sorted(conn.info.get(_TOUCHED, ())))
        payload = subjects if len(subjects) <= _MAX_PAYLOAD else ""
        await conn.execute(text("SELECT pg_notify(:channel, :payload)"),
                           {"channel": CHANNEL, "payload": payload})  # fmt: skip


def forget_pending(conn: AsyncConnection) -> None:
    """Drop the events of ``conn``'s transaction, which did not commit."""
    conn.info.pop(_PENDING, None)


async def trim(conn: AsyncConnection) -> None:
    """Drop the events older than the last ``WINDOW``."""
    newest = await last_id(conn)
    if newest > WINDOW:
        await conn.execute(_events.delete().where(_events.c.seq <= newest - WINDOW))


def host_subject(host_id: str) -> str:
    """The subject of a change that host ``host_id`` must act on: one of its VMs (placed on
    it by another host, or deleted through one)."""
    return f"host:{host_id}"


def subjects_of(payload: str) -> list[str]:
    """The subjects that a notification's payload names; none for an empty or unknown one
    (the listener then wakes everyone)."""
    try:
        found = json.loads(payload) if payload else []
    except ValueError:
        return []
    return [str(subject) for subject in found] if isinstance(found, list) else []


def touched(conn: AsyncConnection, subject: str) -> None:
    """Note that ``conn``'s transaction changes ``subject`` (a VM's ID, a pool's name), for
    ``Changes.notify`` at its commit (``record`` notes the subject of each event)."""
    conn.info.setdefault(_TOUCHED, set()).add(subject)


def take_touched(conn: AsyncConnection) -> set[str]:
    """What ``touched`` noted in ``conn``'s transaction, forgotten here (the connection's
    ``info`` outlives the transaction)."""
    found: set[str] = conn.info.pop(_TOUCHED, set())
    return found


async def read_after(conn: AsyncConnection, after: int, limit: int) -> tuple[list[Event], int]:
    """Up to ``limit`` events after the one with ID ``after``, oldest first, and the ID of the
    oldest event still kept (0 when there is none)."""
    query = select(_events).where(_events.c.seq > after).order_by(_events.c.seq).limit(limit)
    found = [
        Event(id=row.seq, kind=row.kind, subject=row.subject, at=row.at, data=row.data)
        for row in await conn.execute(query)
    ]
    oldest = (await conn.execute(select(func.min(_events.c.seq)))).scalar()
    return found, oldest or 0


async def last_id(conn: AsyncConnection) -> int:
    return (await conn.execute(select(func.max(_events.c.seq)))).scalar() or 0
