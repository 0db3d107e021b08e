"""Callbacks that wait for their receiver: each one is stored when it is due, then tried on a
schedule spread over hours (Standard Webhooks' by default), so a receiver that is down for a
while, or a service that restarts meanwhile, loses none.

A delivery ends when the receiver answers 2xx (``delivered``), 410 (``gone``: it wants no
more), when its URL is refused by the outbound policy, or after the last attempt of the
schedule (``failed``). A ``Retry-After`` answer puts the next attempt no sooner than asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Sequence
from datetime import datetime

import httpx

from goldclone.clock import after, now, seconds_until
from goldclone.models import VM
from goldclone.outbound.callbacks import Outcome, attempt, new_message_id
from goldclone.store import delivery_records
from goldclone.store.database import Database
from goldclone.store.delivery_records import Delivery

log = logging.getLogger(__name__)

MAX_RETRY_AFTER = 86400.0
_IDLE = 60.0
"""Seconds between two looks for due deliveries when none is due sooner."""
_AT_ONCE = 32
"""Deliveries attempted at the same time, at most."""


class Deliveries:
    def __init__(
        self,
        db: Database,
        http: httpx.AsyncClient,
        schedule: Sequence[float],
        secret: str | None,
        ended: Callable[[str], None],
    ) -> None:
        self._db = db
        self._http = http
        self._schedule = tuple(schedule)
        self._secret = secret
        self._ended = ended
        self._trying: dict[str, asyncio.Task[None]] = {}
        self._ended_meanwhile: set[str] = set()
        """Deliveries whose attempt ended while due ones were read: the read may predate the
        end, and must not start them again."""
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def send(self, vm: VM) -> None:
        """Store the VM's callback, as the VM is now, and have it tried at once."""
        if vm.callback_url is None:
            return
        delivery = Delivery(new_message_id(), vm.id, vm.callback_url, vm.model_dump_json(),
                            attempts=0, next_at=after(self._schedule[0]))  # fmt: skip
        host_id = self._db.host_id
        await self._db.write(lambda conn: delivery_records.add(conn, host_id, delivery))
        self._wake.set()

    def start(self) -> None:
        """Try what is due, from now on: also what a stopped service left undelivered."""
        self._task = asyncio.create_task(self._run(), name="callback deliveries")

    async def close(self) -> None:
        tasks = [*self._trying.values(), *([self._task] if self._task else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            self._ended_meanwhile.clear()
            due = await self._db.read(
                functools.partial(
                    delivery_records.due, host_id=self._db.host_id, now=now(), limit=_AT_ONCE
                )
            )
            room = _AT_ONCE - len(self._trying)
            for delivery in due:
                busy = self._trying.keys() | self._ended_meanwhile
                if room > 0 and delivery.message_id not in busy:
                    room -= 1
                    task = asyncio.create_task(self._try(delivery))
                    self._trying[delivery.message_id] = task
                    task.add_done_callback(functools.partial(self._done, delivery.message_id))
            await self._sleep()

    def _done(self, message_id: str, _: asyncio.Task[None]) -> None:
        self._trying.pop(message_id, None)
        self._ended_meanwhile.add(message_id)
        self._wake.set()

    async def _sleep(self) -> None:
        """Until the next delivery is due, one is added, or one being tried is over (a due
        one that is being tried wakes this when it is)."""
        next_at = await self._db.read(lambda conn: delivery_records.next_at(conn, self._db.host_id))
        due_in = _IDLE if next_at is None else seconds_until(next_at)
        wait = _IDLE if due_in <= 0 and self._trying else min(_IDLE, max(0.0, due_in))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._wake.wait()

    async def _try(self, delivery: Delivery) -> None:
        tried = await attempt(self._http, delivery.url, delivery.body.encode(),
                              delivery.message_id, self._secret)  # fmt: skip
        number = delivery.attempts + 1
        if tried.outcome is Outcome.RETRY and number < len(self._schedule):
            wait = self._schedule[number]
            if tried.retry_after is not None:
                wait = max(wait, min(tried.retry_after, MAX_RETRY_AFTER))
            log.warning("callback for VM %s, attempt %d of %d: %s; next in %g s", delivery.vm_id,
                        number, len(self._schedule), tried.reason, wait)  # fmt: skip
            await self._tried(delivery, after(wait))
            return
        outcome = "failed" if tried.outcome in (Outcome.RETRY, Outcome.REFUSED) else tried.outcome
        if outcome != Outcome.DELIVERED:
            log.warning("callback for VM %s not delivered (%s): %s", delivery.vm_id, outcome,
                        tried.reason)  # fmt: skip
        await self._tried(delivery, None)
        self._ended(str(outcome))

    async def _tried(self, delivery: Delivery, next_at: datetime | None) -> None:
        message_id = delivery.message_id
        await self._db.write(lambda conn: delivery_records.tried(conn, message_id, next_at))
