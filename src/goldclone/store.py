"""Where VMs are recorded: SQLAlchemy over SQLite by default, so PostgreSQL can take its place.

A VM is stored as its API object (JSON) plus a ``runtime`` dict that only the service reads:
what a driver and the network need to find the VM's parts again after a restart.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Column, Integer, MetaData, String, Table, event, select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from goldclone.errors import VMNotFound
from goldclone.models import VM

_metadata = MetaData()

_vms = Table(
    "vms",
    _metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(36), nullable=False, unique=True),
    Column("status", String(16), nullable=False, index=True),
    Column("vm", JSON, nullable=False),
    Column("runtime", JSON, nullable=False),
    Column("idempotency_key", String(255), nullable=True, unique=True),
    Column("request_digest", String(64), nullable=True),
)


class Store:
    """VM records, keyed by ID. Every method is one short transaction."""

    def __init__(self, url: str) -> None:
        self._engine: AsyncEngine = create_async_engine(url)
        if self._engine.dialect.name == "sqlite":
            event.listen(self._engine.sync_engine, "connect", _sqlite_for_concurrency)

    async def open(self) -> None:
        async with self._engine.begin() as conn:
            await conn.run_sync(_metadata.create_all)

    async def close(self) -> None:
        await self._engine.dispose()

    async def insert(
        self,
        vm: VM,
        runtime: dict[str, str] | None = None,
        idempotency: tuple[str, str] | None = None,
    ) -> None:
        """Record a new VM; ``idempotency`` is the request's key and the digest of its body."""
        key, digest = idempotency or (None, None)
        async with self._engine.begin() as conn:
            await conn.execute(
                _vms.insert().values(
                    id=vm.id,
                    status=vm.status.value,
                    vm=_dump(vm),
                    runtime=runtime or {},
                    idempotency_key=key,
                    request_digest=digest,
                )
            )

    async def find_by_key(self, key: str) -> tuple[VM, str] | None:
        """The VM created with idempotency ``key``, and the digest of that request's body."""
        query = select(_vms.c.vm, _vms.c.request_digest).where(_vms.c.idempotency_key == key)
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else (VM.model_validate(row.vm), row.request_digest)

    async def save(self, vm: VM) -> None:
        """Write the VM object; raises ``VMNotFound`` if it was deleted meanwhile."""
        async with self._engine.begin() as conn:
            result = await conn.execute(
                _vms.update().where(_vms.c.id == vm.id).values(status=vm.status.value, vm=_dump(vm))
            )
            if result.rowcount == 0:
                raise VMNotFound()

    async def set_runtime(self, vm_id: str, runtime: dict[str, str]) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(_vms.update().where(_vms.c.id == vm_id).values(runtime=runtime))

    async def get(self, vm_id: str) -> VM:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(_vms.c.vm).where(_vms.c.id == vm_id))).first()
        if row is None:
            raise VMNotFound()
        return VM.model_validate(row.vm)

    async def runtime(self, vm_id: str) -> dict[str, str]:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(_vms.c.runtime).where(_vms.c.id == vm_id))).first()
        if row is None:
            raise VMNotFound()
        return dict(row.runtime)

    async def list(self) -> list[VM]:
        """Every VM, in the order they were accepted."""
        query = select(_vms.c.vm).order_by(_vms.c.seq)
        async with self._engine.connect() as conn:
            return [VM.model_validate(row.vm) for row in await conn.execute(query)]

    async def delete(self, vm_id: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(_vms.delete().where(_vms.c.id == vm_id))


def _sqlite_for_concurrency(connection: Any, _: object) -> None:
    """Write-ahead logging lets readers and a writer work at once; in the default journal,
    each waits out the other in SQLite's busy handler, which tripled the POST latency while
    VMs booted (bench/RESULTS.md, d). ``synchronous=NORMAL`` is safe against a crash of the
    service; only an OS crash can lose the last commits."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _dump(vm: VM) -> dict[str, Any]:
    return vm.model_dump(mode="json")
