"""The VM store and its state machine, on real SQLite. Needs neither root nor QEMU."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
import sqlalchemy
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from goldclone.errors import CapacityExceeded, StateConflict, VMNotFound
from goldclone.models import VM, ImageSpec, Phase, Pool, Status, TimelineEntry, now_ms, now_s
from goldclone.service import events, schema, tables
from goldclone.service.store import TRANSITIONS, Candidate, Earlier, Held, Placing, Store


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
        timeline=[TimelineEntry(phase=Phase.ACCEPTED, at=now_ms())],
    )


async def test_vms_persist_across_reopening_in_the_order_accepted(database_url: str) -> None:
    url = database_url
    store = Store(url, "test-host")
    await store.open()
    vms = [make_vm() for _ in range(5)]
    for vm in vms:
        assert await store.admit(vm) == vm
    await store.set_runtime(vms[0].id, {"machine": "m0", "mac": "52:54:00:00:00:01"})
    running = await store.advance(
        vms[2].id,
        Phase.RUNNING,
        expect=Status.CREATING,
        status=Status.RUNNING,
        ip_address="1.2.3.4",
    )
    await store.close()

    reopened = Store(url, "test-host")
    await reopened.open()
    assert [vm.id for vm in await reopened.list()] == [vm.id for vm in vms]
    assert await reopened.get(vms[2].id) == running
    assert [e.phase for e in running.timeline] == [Phase.ACCEPTED, Phase.RUNNING]
    assert await reopened.runtime(vms[0].id) == {"machine": "m0", "mac": "52:54:00:00:00:01"}
    assert await reopened.runtime(vms[1].id) == {}
    assert await reopened.machines() == {"m0", *(vm.id for vm in vms[1:])}
    await reopened.close()


async def test_a_state_change_checks_the_state_it_expects(store: Store) -> None:
    vm = make_vm()
    await store.admit(vm)
    await store.advance(vm.id, Phase.DELETING, expect=tuple(Status), status=Status.DELETING)
    with pytest.raises(StateConflict, match="is deleting; booting needs it creating"):
        await store.advance(vm.id, Phase.BOOTING, expect=Status.CREATING)
    assert (await store.get(vm.id)).status is Status.DELETING
    with pytest.raises(VMNotFound):
        await store.advance(str(uuid.uuid4()), Phase.BOOTING, expect=Status.CREATING)


async def test_only_the_transitions_of_the_state_machine_happen(store: Store) -> None:
    vm = make_vm()
    await store.admit(vm)
    await store.advance(vm.id, Phase.ERROR, expect=Status.CREATING, status=Status.ERROR)
    for target in set(Status) - TRANSITIONS[Status.ERROR]:
        with pytest.raises(StateConflict):
            await store.advance(vm.id, Phase.RUNNING, expect=Status.ERROR, status=target)
    assert (await store.get(vm.id)).status is Status.ERROR


async def test_concurrent_changes_from_two_connections_are_serialized(database_url: str) -> None:
    """Two stores on one file stand for two services: exactly one of two racing changes that
    both expect ``running`` wins, and the other learns it from a ``StateConflict``."""
    url = database_url
    first, second = Store(url, "test-host"), Store(url, "test-host")
    await first.open()
    await second.open()
    try:
        for _ in range(10):
            vm = make_vm()
            await first.admit(vm)
            await first.advance(vm.id, Phase.RUNNING, expect=Status.CREATING, status=Status.RUNNING)
            outcomes = await asyncio.gather(
                first.advance(vm.id, Phase.STOPPED, expect=Status.RUNNING, status=Status.STOPPED),
                second.advance(
                    vm.id, Phase.DELETING, expect=Status.RUNNING, status=Status.DELETING
                ),
                return_exceptions=True,
            )
            assert sum(isinstance(o, StateConflict) for o in outcomes) == 1, outcomes
            assert len((await first.get(vm.id)).timeline) == 3
    finally:
        await first.close()
        await second.close()


async def test_a_repeated_idempotency_key_returns_the_first_vm(database_url: str) -> None:
    url = database_url
    first, second = Store(url, "test-host"), Store(url, "test-host")
    await first.open()
    await second.open()
    try:
        vms = [make_vm() for _ in range(6)]
        outcomes = await asyncio.gather(
            *(
                (first if i % 2 else second).admit(vm, ("key-1", "digest"))
                for i, vm in enumerate(vms)
            )
        )
        new = [outcome for outcome in outcomes if isinstance(outcome, VM)]
        assert len(new) == 1
        repeats = [outcome for outcome in outcomes if isinstance(outcome, Earlier)]
        assert len(repeats) == 5
        assert all(o.vm.id == new[0].id and o.digest == "digest" for o in repeats)
        assert [vm.id for vm in await first.list()] == [new[0].id]
    finally:
        await first.close()
        await second.close()


async def test_capacity_is_checked_in_the_admitting_transaction(store: Store) -> None:
    def at_most_three(candidates: list[Candidate]) -> Candidate:
        [host] = candidates
        if len(host.held) >= 3:
            raise CapacityExceeded("full")
        return host

    await store.beat({"network_types": ["nat"]})
    placing = Placing("sha256-" + "0" * 64, 1, 256, since="", choose=at_most_three)
    outcomes = await asyncio.gather(
        *(store.admit(make_vm(), None, placing) for _ in range(8)), return_exceptions=True
    )
    assert sum(isinstance(o, CapacityExceeded) for o in outcomes) == 5
    assert len(await store.list()) == 3


async def test_only_a_deleting_vm_is_forgotten_or_restored(store: Store) -> None:
    vm = make_vm()
    await store.admit(vm)
    with pytest.raises(StateConflict):
        await store.forget(vm.id)
    with pytest.raises(StateConflict):
        await store.restore(vm)
    await store.advance(vm.id, Phase.DELETING, expect=Status.CREATING, status=Status.DELETING)
    await store.restore(vm)
    assert await store.get(vm.id) == vm
    await store.advance(vm.id, Phase.DELETING, expect=Status.CREATING, status=Status.DELETING)
    await store.forget(vm.id)
    with pytest.raises(VMNotFound):
        await store.forget(vm.id)
    with pytest.raises(VMNotFound):
        await store.runtime(vm.id)


async def test_concurrent_admissions_on_one_database_never_claim_one_pooled_machine_twice(
    database_url: str,
) -> None:
    url = database_url
    first, second = Store(url, "test-host"), Store(url, "test-host")
    await first.open()
    await second.open()
    try:
        image = ImageSpec(url="http://127.0.0.1/x", checksum="0" * 64)  # type: ignore[arg-type]
        pool = Pool(name="ci", image=image, cpus=1, memory=256, network_type="nat", size=3,
                    created_at=now_s())  # fmt: skip
        assert await first.put_pool(pool)
        for n in range(3):
            machine = str(uuid.uuid4())
            await first.add_member("ci", machine, Held(1, 256), None)
            await first.set_member(machine, "ready", {"machine": machine, "mac": f"m{n}"})
        outcomes = await asyncio.gather(
            *((first if i % 2 else second).admit(make_vm(), pools=["ci"]) for i in range(8))
        )
        claimed = [vm for vm in outcomes if isinstance(vm, VM) and vm.started_from == "pool"]
        assert len(claimed) == 3
        runtimes = {(await first.runtime(vm.id))["mac"] for vm in claimed}
        assert runtimes == {"m0", "m1", "m2"}
        assert await first.members() == []
        assert (await first.pool("ci")).claimed == 3
    finally:
        await first.close()
        await second.close()


def test_the_migrations_make_the_tables_that_the_queries_use(tmp_path: Path) -> None:
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'state.db'}")
    with engine.begin() as connection:
        schema.upgrade(connection)
        differences = compare_metadata(MigrationContext.configure(connection), tables.metadata)
    engine.dispose()
    assert differences == []


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
    store = Store(f"sqlite+aiosqlite:///{path}", "first-host")
    await store.open()
    try:
        [adopted] = await store.list()  # its own now
        assert adopted.id == old.id and adopted.host == "first-host"
        assert await store.machines() == {old.id}
    finally:
        await store.close()


async def test_a_heartbeat_wakes_no_one_so_an_idle_stream_still_keeps_alive(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events, "KEEPALIVE", 0.3)

    async def beating() -> None:
        while True:
            await store.beat({})
            await asyncio.sleep(0.05)

    beats = asyncio.create_task(beating())
    stream = events.stream(store, None, None)
    try:
        async with asyncio.timeout(3):
            assert await anext(stream) is None  # a keepalive, though the host beat 6 times
    finally:
        beats.cancel()
        await asyncio.gather(beats, return_exceptions=True)
        await stream.aclose()


async def test_a_watch_of_one_vm_wakes_for_its_commits_and_unknown_ones_only(
    store: Store,
) -> None:
    watched, other = make_vm(), make_vm()
    await store.admit(watched)
    await store.admit(other)

    with store.changes.watching(watched.id) as watch:
        await store.set_runtime(other.id, {"machine": "m1"})
        await store.advance(other.id, Phase.BOOTING, expect=Status.CREATING)
        assert not await watch.wait(0.3)  # two commits, both of another VM
        await store.set_runtime(watched.id, {"machine": "m0"})  # before the wait: not missed
        assert await watch.wait(0.3)
        assert not await watch.wait(0.3)  # woken once per change
        waiting = asyncio.create_task(watch.wait(5))  # waits while the write runs
        await store.advance(watched.id, Phase.BOOTING, expect=Status.CREATING)
        assert await waiting
        store.changes.notify()  # a commit whose subjects are unknown (another host's)
        assert await watch.wait(0.3)


@pytest.mark.parametrize("moment", ["before_cursor_execute", "after_cursor_execute"])
async def test_a_write_whose_caller_is_cancelled_mid_statement_ends_and_blocks_no_other(
    store: Store, moment: str
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

    writer = asyncio.create_task(store.record_event(events.EventKind.IMAGE, "cut", {}))
    sqlalchemy.event.listen(sqlalchemy.Engine, moment, cancel_the_writer)
    try:
        with pytest.raises(asyncio.CancelledError):
            await writer
    finally:
        sqlalchemy.event.remove(sqlalchemy.Engine, moment, cancel_the_writer)
    async with asyncio.timeout(5):  # SQLite's busy handler gives up after 10
        await store.record_event(events.EventKind.IMAGE, "next", {})
    recorded, _ = await store.events_after(0)
    assert [event.subject for event in recorded] == ["cut", "next"]  # the cut-off one ended
