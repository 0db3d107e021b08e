"""Other hosts' commits, heard on PostgreSQL: every event is announced with ``NOTIFY`` at its
commit (``event_log.write_pending``), naming what it touched; this service listens on its own
connection and counts each one as a change of its own, so that ``?wait=true``, ``GET /events``
and this host's work on its VMs (a DELETE asked through another host) wake at once rather than
at the next poll, and only those that wait for what it touched.

A lost connection is made again; what was announced meanwhile is caught up by waking every
waiter once it is back (they read the store, not the notifications).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import asyncpg
from sqlalchemy.engine import make_url

from goldclone.store.changes import Changes
from goldclone.store.event_log import CHANNEL, subjects_of

log = logging.getLogger(__name__)

RECONNECT_AFTER = 2.0
"""Seconds between two attempts to listen again."""


def asyncpg_dsn(url: str) -> str:
    """The libpq-style DSN that asyncpg takes for SQLAlchemy's ``postgresql+asyncpg://`` URL."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class ChangeListener:
    """Listens for other services' commits on a PostgreSQL database."""

    def __init__(self, url: str, changes: Changes) -> None:
        self._dsn = asyncpg_dsn(url)
        self._changes = changes
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen from now on (raises if the first connection fails)."""
        connection = await self._listening()
        self._task = asyncio.create_task(self._keep(connection), name="listen for changes")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _listening(self) -> asyncpg.Connection:
        connection = await asyncpg.connect(self._dsn)
        await connection.add_listener(CHANNEL, self._heard)
        return connection

    def _heard(self, _connection: object, _pid: int, _channel: str, payload: object) -> None:
        self._changes.notify(subjects_of(str(payload)))

    async def _keep(self, connection: asyncpg.Connection) -> None:
        while True:
            lost = asyncio.Event()
            connection.add_termination_listener(_setter(lost))
            try:
                await lost.wait()
            finally:
                with contextlib.suppress(Exception):
                    await connection.close(timeout=5)
            log.warning("lost the connection that hears other hosts' changes; listening again")
            while True:
                await asyncio.sleep(RECONNECT_AFTER)
                try:
                    connection = await self._listening()
                    break
                except (OSError, asyncpg.PostgresError) as exc:
                    log.warning("cannot listen for other hosts' changes yet: %s", exc)
            self._changes.notify()  # whatever was announced while no one listened


def _setter(event: asyncio.Event) -> Callable[[object], None]:
    return lambda _: event.set()
