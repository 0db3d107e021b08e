"""The store: its database, its records and the VM state machine, on real SQLite (and
PostgreSQL). Needs neither root nor QEMU."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from goldclone.clock import now, now_s
from goldclone.errors import CapacityExceeded, StateConflict, VMNotFound
from goldclone.image_spec import ImageSpec
from goldclone.models import VM, Phase, Pool, Status, TimelineEntry
from goldclone.service import events
from goldclone.shape import Shape
from goldclone.store import (
    admissions,
    delivery_records,
    event_log,
    host_records,
    pool_records,
    schema,
    tables,
    vm_records,
)
from goldclone.store.admissions import Placing
from goldclone.store.database import Database
from goldclone.store.delivery_records import Delivery
from goldclone.store.host_records import Candidate, Held
from goldclone.store.vm_records import TRANSITIONS, Earlier
from tests.harness import LONG_AGO
from tests.postgres import PostgresCluster


def make_vm() -> VM:
    return VM(
        id=str(uuid.uuid4()),
        image=ImageSpec(url="http://127.0.0.1/x", checksum="0" * 64),
        cpus=1,
        memory=256,
        network_type="nat",
        headless=True,
        callback_url=None,
        host="test-host",  # as the store records it
        created_at=now_s(),
        timeline=[TimelineEntry(phase=Phase.ACCEPTED, at=now())],
    )


async def advance(
    db: Database,
    vm_id: str,
    phase: Phase,
    expect: Status | tuple[Status, ...],
    status: Status | None = None,
    **fields: object,
) -> VM:
    return await db.write(lambda c: vm_records.change(c, vm_id, expect, phase, status, **fields))


async def get(db: Database, vm_id: str) -> VM:
    return await db.read(lambda c: vm_records.get(c, vm_id))


async def runtime(db: Database, vm_id: str) -> dict[str, str]:
    return await db.read(lambda c: vm_records.runtime(c, vm_id))


async def listed(db: Database) -> list[VM]:
    return await db.read(lambda c: vm_records.of_host(c, db.host_id))


async def machines(db: Database) -> set[str]:
    return await db.read(lambda c: host_records.machines(c, db.host_id))


async def set_runtime(db: Database, vm_id: str, record: dict[str, str]) -> None:
    await db.write(lambda c: vm_records.set_runtime(c, vm_id, record))


async def forget(db: Database, vm_id: str) -> None:
    await db.write(lambda c: vm_records.remove(c, vm_id))


async def put_back(db: Database, vm: VM) -> None:
    await db.write(lambda c: vm_records.put_back(c, vm))


async def test_vms_persist_across_reopening_in_the_order_accepted(database_url: str) -> None:
    url = database_url
    db = Database(url, "test-host")
    await db.open()
    vms = [make_vm() for _ in range(5)]
    for vm in vms:
        assert await admissions.record(db, vm) == vm
    await set_runtime(db, vms[0].id, {"machine": "m0", "mac": "52:54:00:00:00:01"})
    running = await advance(
        db,
        vms[2].id,
        Phase.RUNNING,
        expect=Status.CREATING,
        status=Status.RUNNING,
        ip_address="1.2.3.4",
    )
    await db.close()

    reopened = Database(url, "test-host")
    await reopened.open()
    assert [vm.id for vm in await listed(reopened)] == [vm.id for vm in vms]
    assert await get(reopened, vms[2].id) == running
    assert [e.phase for e in running.timeline] == [Phase.ACCEPTED, Phase.RUNNING]
    assert await runtime(reopened, vms[0].id) == {"machine": "m0", "mac": "52:54:00:00:00:01"}
    assert await runtime(reopened, vms[1].id) == {}
    assert await machines(reopened) == {"m0", *(vm.id for vm in vms[1:])}
    await reopened.close()


async def test_a_state_change_checks_the_state_it_expects(db: Database) -> None:
    vm = make_vm()
    await admissions.record(db, vm)
    await advance(db, vm.id, Phase.DELETING, expect=tuple(Status), status=Status.DELETING)
    with pytest.raises(StateConflict, match="is deleting; booting needs it creating"):
        await advance(db, vm.id, Phase.BOOTING, expect=Status.CREATING)
    assert (await get(db, vm.id)).status is Status.DELETING
    with pytest.raises(VMNotFound):
        await advance(db, str(uuid.uuid4()), Phase.BOOTING, expect=Status.CREATING)


async def test_only_the_transitions_of_the_state_machine_happen(db: Database) -> None:
    vm = make_vm()
    await admissions.record(db, vm)
    await advance(db, vm.id, Phase.ERROR, expect=Status.CREATING, status=Status.ERROR)
    for target in set(Status) - TRANSITIONS[Status.ERROR]:
        with pytest.raises(StateConflict):
            await advance(db, vm.id, Phase.RUNNING, expect=Status.ERROR, status=target)
    assert (await get(db, vm.id)).status is Status.ERROR


async def test_the_stores_errors_name_the_vm_they_are_about(db: Database) -> None:
    """For the logs (``GoldcloneError.about``); the answer a client gets stays its code and
    message, which for a missing VM names no ID (another tenant's VM is not found either)."""
    missing = str(uuid.uuid4())
    with pytest.raises(VMNotFound) as not_found:
        await get(db, missing)
    assert not_found.value.about == {"vm": missing}
    assert missing not in str(not_found.value.as_dict())
    assert not_found.value.context() == f" (vm={missing})"
    vm = make_vm()
    await admissions.record(db, vm)
    with pytest.raises(StateConflict) as refused:
        await advance(db, vm.id, Phase.STOPPED, expect=Status.RUNNING, status=Status.STOPPED)
    assert refused.value.about == {"vm": vm.id}


async def test_concurrent_changes_from_two_connections_are_serialized(database_url: str) -> None:
    """Two stores on one file stand for two services: exactly one of two racing changes that
    both expect ``running`` wins, and the other learns it from a ``StateConflict``."""
    url = database_url
    first, second = Database(url, "test-host"), Database(url, "test-host")
    await first.open()
    await second.open()
    try:
        for _ in range(10):
            vm = make_vm()
            await admissions.record(first, vm)
            await advance(
                first, vm.id, Phase.RUNNING, expect=Status.CREATING, status=Status.RUNNING
            )
            outcomes = await asyncio.gather(
                advance(first, vm.id, Phase.STOPPED, expect=Status.RUNNING, status=Status.STOPPED),
                advance(
                    second, vm.id, Phase.DELETING, expect=Status.RUNNING, status=Status.DELETING
                ),
                return_exceptions=True,
            )
            assert sum(isinstance(o, StateConflict) for o in outcomes) == 1, outcomes
            assert len((await get(first, vm.id)).timeline) == 3
    finally:
        await first.close()
        await second.close()


async def test_a_repeated_idempotency_key_returns_the_first_vm(database_url: str) -> None:
    url = database_url
    first, second = Database(url, "test-host"), Database(url, "test-host")
    await first.open()
    await second.open()
    try:
        vms = [make_vm() for _ in range(6)]
        outcomes = await asyncio.gather(
            *(
                admissions.record(first if i % 2 else second, vm, ("key-1", "digest"))
                for i, vm in enumerate(vms)
            )
        )
        new = [outcome for outcome in outcomes if isinstance(outcome, VM)]
        assert len(new) == 1
        repeats = [outcome for outcome in outcomes if isinstance(outcome, Earlier)]
        assert len(repeats) == 5
        assert all(o.vm.id == new[0].id and o.digest == "digest" for o in repeats)
        assert [vm.id for vm in await listed(first)] == [new[0].id]
    finally:
        await first.close()
        await second.close()


async def test_capacity_is_checked_in_the_admitting_transaction(db: Database) -> None:
    def at_most_three(candidates: list[Candidate]) -> Candidate:
        [host] = candidates
        if len(host.held) >= 3:
            raise CapacityExceeded("full")
        return host

    await db.write(lambda c: host_records.beat(c, db.host_id, {"network_types": ["nat"]}))
    placing = Placing("sha256-" + "0" * 64, Shape(1, 256), since=LONG_AGO, choose=at_most_three)
    outcomes = await asyncio.gather(
        *(admissions.record(db, make_vm(), None, placing) for _ in range(8)), return_exceptions=True
    )
    assert sum(isinstance(o, CapacityExceeded) for o in outcomes) == 5
    assert len(await listed(db)) == 3


async def test_only_a_deleting_vm_is_forgotten_or_restored(db: Database) -> None:
    vm = make_vm()
    await admissions.record(db, vm)
    with pytest.raises(StateConflict):
        await forget(db, vm.id)
    with pytest.raises(StateConflict):
        await put_back(db, vm)
    await advance(db, vm.id, Phase.DELETING, expect=Status.CREATING, status=Status.DELETING)
    await put_back(db, vm)
    assert await get(db, vm.id) == vm
    await advance(db, vm.id, Phase.DELETING, expect=Status.CREATING, status=Status.DELETING)
    await forget(db, vm.id)
    with pytest.raises(VMNotFound):
        await forget(db, vm.id)
    with pytest.raises(VMNotFound):
        await runtime(db, vm.id)


async def test_concurrent_admissions_on_one_database_never_claim_one_pooled_machine_twice(
    database_url: str,
) -> None:
    url = database_url
    first, second = Database(url, "test-host"), Database(url, "test-host")
    await first.open()
    await second.open()
    try:
        image = ImageSpec(url="http://127.0.0.1/x", checksum="0" * 64)  # type: ignore[arg-type]
        pool = Pool(name="ci", image=image, cpus=1, memory=256, network_type="nat", size=3,
                    created_at=now_s())  # fmt: skip
        assert await first.write(lambda c: pool_records.put(c, pool, first.host_id))
        for n in range(3):
            machine = str(uuid.uuid4())
            await admissions.add_member(first, "ci", machine, Held(1, 256), None)
            record = {"machine": machine, "mac": f"m{n}"}
            ready = partial(pool_records.set_member, host_id="test-host", machine=machine,
                            status="ready", runtime=record)  # fmt: skip
            await first.write(ready)
        outcomes = await asyncio.gather(
            *(
                admissions.record(first if i % 2 else second, make_vm(), pools=["ci"])
                for i in range(8)
            )
        )
        claimed = [vm for vm in outcomes if isinstance(vm, VM) and vm.started_from == "pool"]
        assert len(claimed) == 3
        runtimes = {(await runtime(first, vm.id))["mac"] for vm in claimed}
        assert runtimes == {"m0", "m1", "m2"}
        assert await first.read(lambda c: pool_records.members(c, first.host_id)) == []
        assert (await first.read(lambda c: pool_records.one(c, first.host_id, "ci"))).claimed == 3
    finally:
        await first.close()
        await second.close()


async def test_a_reference_names_a_vm_by_id_then_name_then_the_start_of_its_id(
    db: Database,
) -> None:
    ids = ["0a1b2c3d-0000-4000-8000-000000000001", "0a1b2c3d-0000-4000-8000-000000000002",
           "0a1b9999-0000-4000-8000-000000000003"]  # fmt: skip
    names = ["0a1b2c3d-0000-4000-8000-000000000002", "web", "web"]  # a name as another's ID
    for n, (vm_id, name) in enumerate(zip(ids, names, strict=True)):
        vm = make_vm().model_copy(update={"id": vm_id, "name": name,
                                          "tenant": "team-b" if n == 2 else "team-a"})  # fmt: skip
        await admissions.record(db, vm)

    async def matching(ref: str, tenant: str | None = "team-a") -> list[str]:
        return [vm_id for vm_id, _ in await db.read(lambda c: vm_records.matching(c, ref, tenant))]

    assert await matching(ids[1]) == [ids[1]]  # its ID, before the name that spells it
    assert await matching("web") == [ids[1]]  # team-a's only
    assert await matching("web", None) == [ids[1], ids[2]]
    assert await matching("0a1b2c3d") == ids[:2]
    assert await matching("0a1b2c3d-0000-4000-8000-00000000000") == ids[:2]
    assert await matching("0a1b9") == []  # team-b's
    assert await matching("0a1b9", "team-b") == [ids[2]]
    assert await matching("0a1b%") == [] and await matching("0a1b_") == []  # no wildcards


async def test_the_migrations_make_the_tables_that_the_queries_use(db: Database) -> None:
    def compare(connection: sqlalchemy.Connection) -> list[Any]:
        return compare_metadata(MigrationContext.configure(connection), tables.metadata)

    assert await db.read(lambda c: c.run_sync(compare)) == []


_TIME_COLUMNS = [(table.name, column.name) for table in tables.metadata.sorted_tables
                 for column in table.columns if isinstance(column.type, tables.Time)]  # fmt: skip


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def test_times_written_as_text_before_0012_are_read_as_times(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"
    if kind == "postgresql":
        url = await request.getfixturevalue("postgres").new_database()
    engine = create_async_engine(url)
    config = schema._config()

    def to_0011(connection: sqlalchemy.Connection) -> None:
        config.attributes["connection"] = connection
        command.upgrade(config, "0011")

    ended, running = make_vm(), make_vm()
    try:
        async with engine.begin() as conn:
            await conn.run_sync(to_0011)
            for vm, expires in (
                (ended, "2000-01-01T00:00:00.000Z"),
                (running, "2999-01-01T00:00:00.000Z"),
            ):
                await conn.execute(sqlalchemy.text(
                    "INSERT INTO vms (id, status, vm, runtime, expires_at, host_id, tenant) "
                    "VALUES (:id, 'running', :vm, '{}', :expires, 'test-host', 'default')"
                ), {"id": vm.id, "vm": vm.model_dump_json(), "expires": expires})  # fmt: skip
            await conn.execute(sqlalchemy.text(
                "INSERT INTO hosts (id, host, heartbeat_at) VALUES ('old', '{}', :at)"
            ), {"at": "2026-12-07T08:01:43.125Z"})  # fmt: skip
    finally:
        await engine.dispose()
    db = Database(url, "test-host")
    await db.open()
    try:
        assert await db.read(lambda c: vm_records.expired(c, "test-host", now())) == [ended.id]
        [old] = await db.read(host_records.every)
        assert old.heartbeat_at == datetime(2026, 12, 7, 8, 1, 43, 125000, tzinfo=UTC)
        if kind == "postgresql":
            types = await db.read(lambda c: c.execute(sqlalchemy.text(
                "SELECT table_name, column_name FROM information_schema.columns "
                "WHERE data_type = 'timestamp with time zone' AND table_schema = 'public'"
            )))  # fmt: skip
            assert sorted(tuple(row) for row in types) == sorted(_TIME_COLUMNS)
    finally:
        await db.close()


async def test_a_time_reads_back_as_it_was_written_and_in_order(db: Database) -> None:
    elsewhere = timezone(timedelta(hours=-5))
    times = [now(), datetime(2000, 1, 1, tzinfo=UTC), now().astimezone(elsewhere)]
    for n, at in enumerate(times):
        delivery = Delivery(f"m{n}", "vm", "http://127.0.0.1/", "", attempts=0, next_at=at)
        await db.write(partial(delivery_records.add, host_id=db.host_id, delivery=delivery))
    due = await db.read(lambda c: delivery_records.due(c, db.host_id, now(), limit=10))
    assert [d.next_at for d in due] == sorted(times)
    assert {d.next_at.tzinfo for d in due} == {UTC}


async def test_vms_recorded_before_hosts_existed_become_the_first_hosts_own(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db"
    engine = sqlalchemy.create_engine(f"sqlite:///{path}")
    config = schema._config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0007")  # the release before hosts
        old = make_vm().model_copy(update={"host": None})
        connection.execute(tables.vms.insert().values(
            id=old.id, status="running", vm=old.model_dump(mode="json"), runtime={},
        ))  # fmt: skip
    engine.dispose()
    db = Database(f"sqlite+aiosqlite:///{path}", "first-host")
    await db.open()
    await db.write(lambda c: host_records.adopt_unowned(c, "first-host"))  # as a start does
    try:
        [adopted] = await listed(db)  # its own now
        assert adopted.id == old.id and adopted.host == "first-host"
        assert adopted.tenant == "default"  # as every VM made before tenants
        tenants = await db.read(lambda c: c.execute(sqlalchemy.select(tables.vms.c.tenant)))
        assert [row.tenant for row in tenants] == ["default"]
        assert await machines(db) == {old.id}
    finally:
        await db.close()


async def test_a_heartbeat_wakes_no_one_so_an_idle_stream_still_keeps_alive(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events, "KEEPALIVE", 0.3)

    async def beating() -> None:
        while True:
            await db.write(lambda c: host_records.beat(c, db.host_id, {}))
            await asyncio.sleep(0.05)

    beats = asyncio.create_task(beating())
    stream = events.stream(db, None, None)
    try:
        async with asyncio.timeout(3):
            assert await anext(stream) is None  # a keepalive, though the host beat 6 times
    finally:
        beats.cancel()
        await asyncio.gather(beats, return_exceptions=True)
        await stream.aclose()


async def test_a_watch_of_one_vm_wakes_for_its_commits_and_unknown_ones_only(
    db: Database,
) -> None:
    watched, other = make_vm(), make_vm()
    await admissions.record(db, watched)
    await admissions.record(db, other)

    with db.changes.watching(watched.id) as watch:
        await set_runtime(db, other.id, {"machine": "m1"})
        await advance(db, other.id, Phase.BOOTING, expect=Status.CREATING)
        assert not await watch.wait(0.3)  # two commits, both of another VM
        await set_runtime(db, watched.id, {"machine": "m0"})  # before the wait: not missed
        assert await watch.wait(0.3)
        assert not await watch.wait(0.3)  # woken once per change
        waiting = asyncio.create_task(watch.wait(5))  # waits while the write runs
        await advance(db, watched.id, Phase.BOOTING, expect=Status.CREATING)
        assert await waiting
        db.changes.notify()  # a commit whose subjects are unknown (another host's)
        assert await watch.wait(0.3)


@pytest.mark.parametrize("moment", ["before_cursor_execute", "after_cursor_execute"])
async def test_a_write_whose_caller_is_cancelled_mid_statement_ends_and_blocks_no_other(
    db: Database, moment: str
) -> None:
    """A write whose caller is cancelled (a DELETE cuts off its VM's create task wherever it
    is) runs to its end: a transaction cut off inside SQLite's driver once kept the write
    lock, and every later write failed with "database is locked"."""
    writer: asyncio.Task[None] | None = None

    def cancel_the_writer(*args: object) -> None:
        statement = str(args[2])
        if writer is not None and statement.startswith("INSERT INTO events"):
            # from elsewhere, as a DELETE does: while the statement runs, or then its commit
            asyncio.get_running_loop().call_soon(writer.cancel)

    writer = asyncio.create_task(
        db.write(lambda c: event_log.record(c, event_log.EventKind.IMAGE, "cut", {}))
    )
    sqlalchemy.event.listen(sqlalchemy.Engine, moment, cancel_the_writer)
    try:
        with pytest.raises(asyncio.CancelledError):
            await writer
    finally:
        sqlalchemy.event.remove(sqlalchemy.Engine, moment, cancel_the_writer)
    async with asyncio.timeout(5):  # SQLite's busy handler gives up after 10
        await db.write(lambda c: event_log.record(c, event_log.EventKind.IMAGE, "next", {}))
    recorded, _ = await db.read(lambda c: event_log.read_after(c, 0, 500))
    assert [event.subject for event in recorded] == ["cut", "next"]  # the cut-off one ended


async def test_a_reader_resuming_after_the_last_event_it_saw_misses_none_committed_later(
    postgres: PostgresCluster,
) -> None:
    """Two transactions at once (PostgreSQL), the first to record an event committing last:
    a reader that read the second's event, and then asks for what follows it, gets the
    first's. With event IDs drawn when an event is recorded, the first's has the smaller ID
    and is skipped."""
    db = Database(await postgres.new_database(), "test-host")
    await db.open()
    try:
        first, second = make_vm(), make_vm()
        recorded, finish = asyncio.Event(), asyncio.Event()

        async def slow(conn: AsyncConnection) -> None:
            await vm_records.add(conn, first, {})
            recorded.set()
            await finish.wait()

        slow_write = asyncio.ensure_future(db.write(slow))
        try:
            async with asyncio.timeout(10):  # a write that failed never records: not a hang
                await recorded.wait()
            await db.write(lambda conn: vm_records.add(conn, second, {}))
            seen, _ = await db.read(partial(event_log.read_after, after=0, limit=10))
            assert [event.subject for event in seen] == [second.id]
        finally:
            finish.set()
            await slow_write
        later, _ = await db.read(partial(event_log.read_after, after=seen[-1].id, limit=10))
        assert [event.subject for event in later] == [first.id]
    finally:
        await db.close()


async def test_the_window_is_trimmed_apart_from_the_writes(db: Database) -> None:
    await db.write(lambda conn: vm_records.add(conn, make_vm(), {}))
    for _ in range(3):
        await db.write(lambda conn: vm_records.add(conn, make_vm(), {}))
    newest = await db.read(event_log.last_id)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(event_log, "WINDOW", 2)
        await db.write(lambda conn: vm_records.add(conn, make_vm(), {}))
        kept, oldest = await db.read(partial(event_log.read_after, after=0, limit=10))
        assert len(kept) == 5  # a write trims nothing
        await db.write(event_log.trim)
        kept, oldest = await db.read(partial(event_log.read_after, after=0, limit=10))
    assert [event.id for event in kept] == [newest, newest + 1] and oldest == newest
