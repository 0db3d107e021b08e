"""The change log that ``GET /events`` streams and ``?wait=true`` waits on.

Every change of a VM, pool or image is written to the ``events`` table in the transaction
that makes it, so the log misses nothing that was committed and survives restarts (and, on a
shared database, every service sees every host's changes). Each event's ``id`` is its row's
sequence number, so IDs only grow; the table keeps the last ``WINDOW`` events. ``Changes``
wakes, on this service, whoever waits for the next commit, or for the next one that touches
one VM: a ``?wait=true`` woken by every commit re-read its VM each time, and 20 of them during
20 restores cost the service 3.6 CPU-s, against 1.9 once each woke for its own VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from goldclone.labels import matches
from goldclone.models import VM, Status, now_ms
from goldclone.service.tables import events as _events

if TYPE_CHECKING:
    from goldclone.service.store import Store

log = logging.getLogger(__name__)

WINDOW = 10_000
"""Events kept; a client that comes back after more than that many is told with ``dropped``."""
KEEPALIVE = 15.0
"""Seconds of quiet after which a stream says it is still there."""
_BATCH = 500
CHANNEL = "goldclone_changes"
"""The PostgreSQL notification channel that every event is announced on, at its commit."""
_TOUCHED = "goldclone_touched"
"""The key, in a connection's ``info``, of the subjects its transaction has changed."""


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
    at: str
    data: dict[str, Any]


async def record(
    conn: AsyncConnection, kind: EventKind, subject: str, data: Mapping[str, Any]
) -> None:
    """Add an event in ``conn``'s transaction, and drop those beyond the window."""
    touched(conn, subject)
    inserted = await conn.execute(
        _events.insert().values(kind=kind.value, subject=subject, data=dict(data), at=now_ms())
    )
    (seq,) = inserted.inserted_primary_key or (None,)
    if seq is not None and seq > WINDOW:
        await conn.execute(_events.delete().where(_events.c.seq <= seq - WINDOW))
    if conn.dialect.name == "postgresql":  # sent at commit, to every listening service
        await conn.execute(text(f"NOTIFY {CHANNEL}"))


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


FOLLOW_EVERY = 10.0
"""Seconds after which a host looks again at what other hosts asked of it (DELETEs of its VMs,
creates placed on it, pools made or changed) without hearing of a change."""


class Changes:
    """A counter of this service's commits (and, on PostgreSQL, of every service's: see
    ``service.listener``), a way to wait for the next one, and a way to wait for the next one
    that touches one subject (``watching``)."""

    def __init__(self) -> None:
        self.version = 0
        self._next = asyncio.Event()
        self._watches: dict[str, set[asyncio.Event]] = {}

    def notify(self, subjects: Collection[str] = ()) -> None:
        """Count a commit, which changed ``subjects``; one of unknown subjects (another host's,
        heard without them) wakes every watch."""
        self.version += 1
        self._next.set()
        self._next = asyncio.Event()
        groups = (
            self._watches.values() if not subjects
            else [self._watches.get(subject, set()) for subject in subjects]
        )  # fmt: skip
        for group in groups:
            for event in group:
                event.set()

    @contextlib.contextmanager
    def watching(self, subject: str) -> Iterator[Watch]:
        """A ``Watch`` of the commits that touch ``subject``, from now on: made before the
        subject is read, it misses no change made after that read."""
        event = asyncio.Event()
        group = self._watches.setdefault(subject, set())
        group.add(event)
        try:
            yield Watch(event)
        finally:
            group.discard(event)
            if not group:
                self._watches.pop(subject, None)

    async def follow(
        self, work: Callable[[], Awaitable[None]], what: str, every: float = FOLLOW_EVERY
    ) -> None:
        """Run ``work`` now, after each change, and at least every ``every`` seconds, for
        ever; a failed run is logged (as ``what`` failing) and the next one tries again."""
        while True:
            seen = self.version
            try:
                await work()
            except Exception:
                log.exception("%s failed; trying again", what)
            await self.wait(seen, every)

    async def wait(self, seen: int, timeout: float) -> None:
        """Return once ``version`` is past ``seen``, or after ``timeout`` seconds."""
        if self.version == seen:
            await _set_within(self._next, timeout)


@dataclass
class Watch:
    """The commits that touch one subject since the watch began or last woke."""

    _event: asyncio.Event

    async def wait(self, timeout: float) -> bool:
        """Return at the next commit that touches the subject (at once if one came since the
        last wait), or after ``timeout`` seconds: whether such a commit came."""
        woken = await _set_within(self._event, timeout)
        self._event.clear()
        return woken


async def _set_within(event: asyncio.Event, timeout: float) -> bool:
    """Whether ``event`` is set within ``timeout`` seconds."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            return await event.wait()
    return False


@dataclass(frozen=True)
class VMFilter:
    """``GET /vms``'s and ``GET /events``'s filters: every label given, and one of the
    statuses given (any, without)."""

    labels: Mapping[str, str] = field(default_factory=dict)
    statuses: frozenset[Status] = frozenset()

    def matches(self, vm: VM) -> bool:
        return matches(vm.labels, self.labels) and (not self.statuses or vm.status in self.statuses)

    def passes(self, event: Event) -> bool:
        """A VM's event if its VM matches; the others only without filters."""
        if event.kind in (EventKind.VM, EventKind.VM_DELETED):
            return self.matches(VM.model_validate(event.data))
        return not self.labels and not self.statuses


async def stream(
    store: Store, after: int | None, wanted: VMFilter | None
) -> AsyncIterator[Event | None]:
    """The events after the one with ID ``after`` (those still kept, then each new one as it
    is committed), or from now without ``after``; ``None`` after each ``KEEPALIVE`` seconds
    without one. If events after ``after`` were dropped from the window, a ``dropped``
    event comes first, with the ID of the last one dropped."""
    last = await store.last_event_id() if after is None else after
    while True:
        seen = store.changes.version
        found, oldest = await store.events_after(last, _BATCH)
        if found and oldest > last + 1:
            missed = {"after": last, "resumes_at": found[0].id}
            yield Event(id=found[0].id - 1, kind=EventKind.DROPPED, subject="", at=now_ms(),
                        data=missed)  # fmt: skip
        for event in found:
            last = event.id
            if wanted is None or wanted.passes(event):
                yield event
        if len(found) < _BATCH:
            await store.changes.wait(seen, KEEPALIVE)
            if store.changes.version == seen:
                yield None
