"""The change log as ``GET /events`` streams it and its filters; the log itself is
``store.event_log``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from functools import partial

from goldclone.clock import now
from goldclone.labels import matches
from goldclone.models import VM, Status
from goldclone.store import event_log
from goldclone.store.database import Database
from goldclone.store.event_log import Event, EventKind

KEEPALIVE = 15.0
"""Seconds of quiet after which a stream says it is still there."""
_BATCH = 500


@dataclass(frozen=True)
class VMFilter:
    """``GET /vms``'s and ``GET /events``'s filters: the VMs of ``tenant`` (any, without),
    with every label given, and one of the statuses given (any, without)."""

    labels: Mapping[str, str] = field(default_factory=dict)
    statuses: frozenset[Status] = frozenset()
    tenant: str | None = None

    def matches(self, vm: VM) -> bool:
        return (
            (self.tenant is None or vm.tenant == self.tenant)
            and matches(vm.labels, self.labels)
            and (not self.statuses or vm.status in self.statuses)
        )

    def passes(self, event: Event) -> bool:
        """A VM's event if its VM matches; the others (images, pools) only without labels or
        statuses."""
        if event.kind in (EventKind.VM, EventKind.VM_DELETED):
            return self.matches(VM.model_validate(event.data))
        return not self.labels and not self.statuses


async def stream(
    db: Database, after: int | None, wanted: VMFilter | None
) -> AsyncIterator[Event | None]:
    """The events after the one with ID ``after`` (those still kept, then each new one as it
    is committed), or from now without ``after``; ``None`` after each ``KEEPALIVE`` seconds
    without one. If events after ``after`` were dropped from the window, a ``dropped``
    event comes first, with the ID of the last one dropped."""
    last = await db.read(event_log.last_id) if after is None else after
    while True:
        seen = db.changes.version
        found, oldest = await db.read(partial(event_log.read_after, after=last, limit=_BATCH))
        if found and oldest > last + 1:
            missed = {"after": last, "resumes_at": found[0].id}
            yield Event(id=found[0].id - 1, kind=EventKind.DROPPED, subject="", at=now(),
                        data=missed)  # fmt: skip
        for event in found:
            last = event.id
            if wanted is None or wanted.passes(event):
                yield event
        if len(found) < _BATCH:
            await db.changes.wait(seen, KEEPALIVE)
            if db.changes.version == seen:
                yield None
