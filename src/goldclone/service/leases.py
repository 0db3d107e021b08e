"""VM leases: when each VM ends unless renewed, and the sweep that destroys those that ended.

A lease is the VM's ``expires_at``, stored with it (and in an indexed column), so an expiry
survives restarts: the sweep runs at start too, before anything waits on a VM that a stopped
service let expire.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from goldclone.clock import after, now
from goldclone.errors import GoldcloneError, InvalidRequest, StateConflict, VMNotFound
from goldclone.settings import Settings
from goldclone.store import vm_records
from goldclone.store.database import Database

log = logging.getLogger(__name__)

SWEEP_INTERVAL = 1.0
"""Seconds between two looks for ended leases: a VM goes within this of its expiry, plus
its teardown."""


@dataclass(frozen=True)
class LeasePolicy:
    default: int
    maximum: int
    allow_none: bool

    @classmethod
    def of(cls, settings: Settings) -> LeasePolicy:
        return cls(settings.default_ttl, settings.max_ttl, settings.allow_no_lease)

    def expiry(self, ttl: int | None, given: bool) -> datetime | None:
        """When a lease of ``ttl`` seconds from now ends (``given``: the request named a
        ``ttl``; otherwise the default applies); ``None`` for no lease. Raises
        ``InvalidRequest`` for a lease longer than the maximum, or none where none is allowed."""
        if not given:
            return after(self.default) if self.default else None
        if not ttl:
            if not self.allow_none:
                raise InvalidRequest(
                    f"ttl: every VM needs a lease on this server (1 to {self.maximum} s)"
                )
            return None
        if ttl > self.maximum:
            raise InvalidRequest(
                f"ttl: {ttl} s is longer than this server allows ({self.maximum} s)"
            )
        return after(ttl)


class Sweeper:
    """Destroys, through ``expire``, every VM whose lease has ended."""

    def __init__(self, db: Database, expire: Callable[[str], Awaitable[None]]) -> None:
        self._db = db
        self._expire = expire
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Sweep once (what ended while the service was stopped), then every second."""
        await self.sweep()
        self._task = asyncio.create_task(self._run(), name="lease sweeper")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def sweep(self) -> None:
        host_id, moment = self._db.host_id, now()
        for vm_id in await self._db.read(lambda conn: vm_records.expired(conn, host_id, moment)):
            try:
                await self._expire(vm_id)
            except (VMNotFound, StateConflict):
                pass  # deleted, or being deleted, meanwhile
            except GoldcloneError as exc:  # the hypervisor refused: tried again next time
                log.warning("VM %s: its lease ended but it is not destroyed yet: %s", vm_id, exc)
            except Exception:
                log.exception("VM %s: its lease ended but it could not be destroyed", vm_id)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            await self.sweep()
