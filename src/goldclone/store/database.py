"""The database that the store's records live in: SQLAlchemy over SQLite by default, so that
PostgreSQL can take its place. Each aggregate's queries are functions of their own module
(``vm_records``, ``pool_records``, ...) that take a connection; ``Database.write`` runs one of
them, or several that make one change together, in one transaction, and ``Database.read``
runs reads.

Every change of a record is a transaction that reads what it changes under a write lock
(``BEGIN IMMEDIATE`` on SQLite, ``SELECT ... FOR UPDATE`` elsewhere) and checks it before it
writes: a compare-and-set, so that two actors (a create task and a DELETE, two services on one
database) never overwrite each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy import event, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from goldclone.errors import StoreUnavailable
from goldclone.models import VM
from goldclone.settings import StorePool
from goldclone.store import event_log, schema
from goldclone.store.changes import Changes
from goldclone.store.tables import vms as _vms

log = logging.getLogger(__name__)
T = TypeVar("T")
Work = Callable[[AsyncConnection], Awaitable[T]]
"""What runs in one transaction: queries of the record modules, given its connection."""

DEFAULT_POOL = StorePool()
RETRY_FIRST, RETRY_MOST = 0.2, 2.0
"""Seconds between two tries of a write that waits for the store: first, and at most."""
_UNAVAILABLE_CLASSES = ("08", "53", "57")
_MIGRATION_LOCK = 0x676F6D69  # "gomi": the key of the advisory lock that migrations take
_PHASED = "goldclone_phased"
"""The key, in a connection's ``info``, of the VMs whose transaction gave them a phase."""


class Database:
    """The store's database, as the service on host ``host_id`` uses it.

    Several hosts may share one database (PostgreSQL). What stands for a host's own machines
    and files (VMs, pools' machines, templates, cleanups, callbacks) is written with its host
    ID; each record module's functions take the host they are about. ``on_phase`` is told of
    each VM that got a new phase (``note_phase``), once that is committed.
    """

    def __init__(
        self,
        url: str,
        host_id: str,
        on_phase: Callable[[VM], None] | None = None,
        pool: StorePool = DEFAULT_POOL,
    ) -> None:
        self.host_id = host_id
        sqlite = url.startswith("sqlite")
        # SQLite's connections are threads of this process; 50 VMs restored at once, each
        # polled by its client, waited past the default pool's 30 s for one
        sizes = (
            {"pool_size": 20, "max_overflow": 40} if sqlite
            else {"pool_size": pool.size, "max_overflow": pool.overflow}
        )  # fmt: skip
        self._engine: AsyncEngine = create_async_engine(url, pool_timeout=pool.timeout, **sizes)
        self._pool_timeout = pool.timeout
        self._down: str | None = None
        """Why the store was last found unavailable, until it answers again."""
        if self._engine.dialect.name == "sqlite":
            event.listen(self._engine.sync_engine, "connect", _sqlite_for_concurrency)
            event.listen(self._engine.sync_engine, "begin", _sqlite_begin)
        self._writer = self._engine.execution_options(goldclone_write=True)
        self._one_writer = asyncio.Lock() if self._engine.dialect.name == "sqlite" else None
        self._on_phase = on_phase
        self.changes = Changes()

    @property
    def shared(self) -> bool:
        """Whether other services may share this database (PostgreSQL, not SQLite)."""
        return self._engine.dialect.name == "postgresql"

    async def write(self, work: Work[T], wait: float = 0.0) -> T:
        """``work``'s result, run in one write transaction to its end even if the caller is
        cancelled (``_to_the_end``). Its commit wakes this service's waiters if it changed
        what they can wait for (``event_log.touched``): a heartbeat wakes no one. Raises
        ``StoreUnavailable`` when the database cannot be reached or gives no connection in
        time, at once, or once it has been so for ``wait`` seconds (work in flight, which
        waits for the database to come back, trying again and again)."""
        loop = asyncio.get_running_loop()
        deadline, pause = loop.time() + wait, RETRY_FIRST
        while True:
            try:
                return await self._reached(_to_the_end(self._write(work)))
            except StoreUnavailable:
                if loop.time() + pause > deadline:
                    raise
                if pause == RETRY_FIRST:
                    log.info("work in flight waits for the store to come back")
            await asyncio.sleep(pause)  # a back-off between tries: the store says nothing
            pause = min(2 * pause, RETRY_MOST)

    async def read(self, work: Work[T]) -> T:
        """``work``'s result, run on a connection that writes nothing, to its end; raises
        ``StoreUnavailable`` as ``write`` does."""
        return await self._reached(_to_the_end(self._read(work)))

    async def _reached(self, work: Awaitable[T]) -> T:
        """``work``'s result, with the errors of a database that is down, restarting or out
        of connections (and of a pool that had none free in time) as ``StoreUnavailable``,
        logged once when it goes and once when it is back."""
        try:
            result = await work
        except (sa_exc.TimeoutError, sa_exc.DBAPIError, OSError) as exc:
            if (reason := _unavailable(exc, self._pool_timeout)) is None:
                raise
            if self._down is None:
                log.warning("the store is unavailable: %s", reason)
            self._down = reason
            raise StoreUnavailable(f"the database is unavailable ({reason}); try again") from None
        if self._down is not None:
            log.info("the store is available again")
            self._down = None
        return result

    async def _write(self, work: Work[T]) -> T:
        """SQLite has one writer at a time: this service's writers queue here, on the event
        loop, rather than in SQLite's busy handler, which gives up after ``busy_timeout``
        (50 concurrent creates on a loaded host waited longer, and failed with "database is
        locked"); the busy handler is left to other processes."""
        async with contextlib.AsyncExitStack() as stack:
            if self._one_writer is not None:
                await stack.enter_async_context(self._one_writer)
            conn = await stack.enter_async_context(self._writer.begin())
            try:
                result = await work(conn)
                await event_log.write_pending(conn)
            finally:
                event_log.forget_pending(conn)
                touched = event_log.take_touched(conn)
                phased: list[VM] = conn.info.pop(_PHASED, [])
        if touched:
            self.changes.notify(touched)  # committed
        if self._on_phase is not None:
            for vm in phased:
                self._on_phase(vm)
        return result

    async def _read(self, work: Work[T]) -> T:
        async with self._engine.connect() as conn:
            return await work(conn)

    async def open(self) -> None:
        """Bring the database to this code's schema (``store.schema``). On PostgreSQL,
        services that start at once migrate one after another (each of three creating
        ``alembic_version`` failed all but one): the schema's changes are transactional
        there, and the lock is held until they commit."""

        async def migrate(conn: AsyncConnection) -> None:
            if self.shared:
                await conn.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK}
                )
            await conn.run_sync(schema.upgrade)

        await self.write(migrate)

    async def close(self) -> None:
        await self._engine.dispose()

    async def health(self) -> str | None:
        """Why the database cannot be read, or ``None``."""
        try:
            async with self._engine.connect() as conn:
                await conn.execute(select(_vms.c.seq).limit(1))
        except Exception as exc:  # whatever the database driver raises
            return f"the store cannot be read: {type(exc).__name__}"
        return None


def _unavailable(exc: Exception, pool_timeout: float) -> str | None:
    """Why ``exc`` means the database cannot be used now, or ``None`` for any other error:
    no connection free in the pool, none that could be opened, one lost, or the server
    refusing for its connection limit or its start or shutdown (SQLSTATE classes 08, 53, 57)."""
    if isinstance(exc, sa_exc.TimeoutError):
        return f"no connection was free within {pool_timeout:g} s"
    if isinstance(exc, OSError):
        return f"it cannot be reached: {type(exc).__name__}"
    assert isinstance(exc, sa_exc.DBAPIError)
    state = str(getattr(exc.orig, "sqlstate", None) or "")
    lost = exc.connection_invalidated or isinstance(exc, sa_exc.InterfaceError)
    if lost or state[:2] in _UNAVAILABLE_CLASSES:
        return f"{type(exc.orig).__name__}" + (f", SQLSTATE {state}" if state else "")
    return None


def note_phase(conn: AsyncConnection, vm: VM) -> None:
    """Note that ``conn``'s transaction gives ``vm`` a new phase, for ``on_phase``."""
    conn.info.setdefault(_PHASED, []).append(vm)


async def _to_the_end(work: Awaitable[T]) -> T:
    """``work``'s result, run to its end in a task of its own; its caller's cancellation is
    raised once it has ended. A transaction cut off inside the database driver can outlive
    its connection (on SQLite, one kept the write lock, and every later write failed with
    "database is locked"), and a DELETE cuts off its VM's create task wherever that is."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():  # a further cancellation waits on too
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({task})
        if not task.cancelled():
            task.exception()  # retrieved: the caller is gone
        raise


def _sqlite_for_concurrency(connection: Any, _: object) -> None:
    """Write-ahead logging lets readers and a writer work at once; in the default journal,
    each waits out the other in SQLite's busy handler, which tripled the POST latency while
    VMs booted (bench/RESULTS.md, d). ``synchronous=NORMAL`` is safe against a crash of the
    service; only an OS crash can lose the last commits. Transactions are begun by
    ``_sqlite_begin`` rather than by the driver's own guesswork."""
    connection.isolation_level = None
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def _sqlite_begin(conn: Any) -> None:
    """A write transaction takes SQLite's write lock when it begins (``BEGIN IMMEDIATE``), so
    what it reads cannot change before it writes; a read-only one does not block writers."""
    immediate = conn.get_execution_options().get("goldclone_write", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
