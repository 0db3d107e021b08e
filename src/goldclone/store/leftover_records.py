"""What the teardown of a VM's machine could not remove, for reconciliation to retry."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from goldclone.store.tables import cleanups as _cleanups


@dataclass(frozen=True)
class Leftover:
    """The machine of a VM and its runtime record, for the driver to destroy again, and why
    the last attempt failed."""

    vm_id: str
    machine: str
    runtime: dict[str, str]
    reason: str
    attempts: int = 0
    seq: int = 0


async def add(conn: AsyncConnection, host_id: str, leftover: Leftover) -> None:
    await conn.execute(
        _cleanups.insert().values(
            vm_id=leftover.vm_id, machine=leftover.machine, runtime=leftover.runtime,
            reason=leftover.reason, attempts=leftover.attempts, host_id=host_id,
        )
    )  # fmt: skip


async def of_host(conn: AsyncConnection, host_id: str) -> tuple[Leftover, ...]:
    """``host_id``'s leftovers, oldest first."""
    query = select(_cleanups).where(_cleanups.c.host_id == host_id).order_by(_cleanups.c.seq)
    return tuple(
        Leftover(row.vm_id, row.machine, dict(row.runtime), row.reason, row.attempts, row.seq)
        for row in await conn.execute(query)
    )


async def done(conn: AsyncConnection, leftover: Leftover, failure: str | None) -> None:
    """Forget ``leftover``, removed at last; or, with the ``failure`` of this attempt, count
    the attempt."""
    where = _cleanups.c.seq == leftover.seq
    if failure is None:
        await conn.execute(_cleanups.delete().where(where))
    else:
        await conn.execute(
            _cleanups.update()
            .where(where)
            .values(reason=failure, attempts=_cleanups.c.attempts + 1)
        )
