"""Admissions: the changes that give a host's capacity to a new VM or pool machine, each one
transaction over several aggregates, after every other admission to the fleet."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from goldclone.models import VM
from goldclone.shape import Shape
from goldclone.store import handoff_records, host_records, pool_records, vm_records
from goldclone.store.database import Database
from goldclone.store.host_records import Candidate, Held
from goldclone.store.vm_records import Earlier


@dataclass(frozen=True)
class Placing:
    """How a VM is placed: the image (its key, as the request names it), its shape, the
    oldest heartbeat of a host that is up, and the policy that chooses among the candidates
    (raising ``CapacityExceeded`` when none has room)."""

    image_key: str
    shape: Shape
    since: datetime
    choose: Callable[[list[Candidate]], Candidate]


async def record(
    db: Database,
    vm: VM,
    idempotency: tuple[str, str] | None = None,
    placing: Placing | None = None,
    pools: Sequence[str] = (),
    request: str | None = None,
) -> VM | Earlier:
    """Record a new VM and return it as recorded, unless ``idempotency`` (the request's key
    and the digest of its body) was seen before: then nothing is recorded and the earlier VM
    is returned.

    With ``placing``, the VM goes to the host that its policy chooses among the hosts that are
    up (``db``'s own host, without it). All of this is one transaction, after every other
    admission to the fleet (``host_records.lock_admissions``), so concurrent creates on any
    hosts can't both take a host's last place. If one of ``pools`` has a ready machine on
    that host, the VM claims it: the machine leaves its pool and becomes the VM's (its
    runtime record is the VM's), and the VM is recorded ``started_from: "pool"``; so no two
    VMs claim one machine. A VM placed on another host is handed to it with ``request`` (its
    JSON). A ``vm.name`` that a recorded VM of its tenant has is a ``NameConflict``; keys and
    names are each tenant's own.
    """
    key = idempotency[0] if idempotency is not None else None

    async def place_and_record(conn: AsyncConnection) -> VM | Earlier:
        await host_records.lock_admissions(conn)
        if key is not None and (earlier := await vm_records.find_by_key(conn, vm.tenant, key)):
            return earlier
        await vm_records.check_name_free(conn, vm.tenant, vm.name)
        host = db.host_id
        if placing is not None:
            found = await host_records.candidates(
                conn, placing.since, placing.image_key, placing.shape, pools
            )
            host = placing.choose(found).host_id
        placed = vm.model_copy(update={"host": host})
        runtime: dict[str, str] = {}
        if (member := await pool_records.claim(conn, pools, host)) is not None:
            placed = placed.model_copy(update={"started_from": "pool", "pool": member.pool})
            runtime = member.runtime
        await vm_records.add(conn, placed, runtime, idempotency)
        if host != db.host_id:
            assert request is not None, "a VM for another host needs its request"
            await handoff_records.add(conn, placed.id, host, request)
        return placed

    async def after_race(conn: AsyncConnection) -> Earlier | None:
        if key is not None and (earlier := await vm_records.find_by_key(conn, vm.tenant, key)):
            return earlier
        await vm_records.check_name_free(conn, vm.tenant, vm.name)
        return None

    try:
        return await db.write(place_and_record)
    except IntegrityError:
        # another service on this database took the key or the name between our read and our
        # insert
        if (earlier := await db.read(after_race)) is None:
            raise
        return earlier


async def add_member(
    db: Database,
    pool: str,
    machine: str,
    wanted: Held,
    check_capacity: Callable[[list[Held]], None] | None,
) -> None:
    """Record a machine that ``pool`` is about to restore on ``db``'s host, if the host has
    room for it (``check_capacity``, given what the host holds, raises if not)."""

    async def add(conn: AsyncConnection) -> None:
        await host_records.lock_admissions(conn)
        if check_capacity is not None:
            check_capacity(await host_records.held_by(conn, db.host_id))
        await pool_records.add_member(conn, db.host_id, pool, machine, wanted.cpus, wanted.memory)

    await db.write(add)
