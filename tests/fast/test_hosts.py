"""Several hosts on one PostgreSQL database: each a service in this process with its own data
dir and synthetic hypervisor, on a real PostgreSQL server. What each host sees of the others'
VMs, and what it does (and never does) about them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from goldclone.access import Role, Token, digest_of
from goldclone.image_spec import ImageSpec
from goldclone.models import Pool
from goldclone.service.fleet import HOST_ID_FILE
from goldclone.settings import Limits, Settings
from goldclone.store import event_log, pool_records, vm_records
from goldclone.store.database import Database
from goldclone.store.listener import ChangeListener
from tests.fast.conftest import Service, image_of, serving
from tests.fast.test_pools import pooled
from tests.fast.test_store import make_vm
from tests.postgres import PostgresCluster
from tests.servers import FileServer

LOST_AFTER = 1.5
"""Seconds without a heartbeat after which the tests' hosts are lost (every 0.2 s, they beat)."""


@pytest.fixture
async def fleet_url(postgres: PostgresCluster) -> str:
    url: str = await postgres.new_database()
    return url


@pytest.fixture
def host_settings(tmp_path: Path, fleet_url: str) -> Any:
    def settings(
        name: str, max_vms: int | None = None, host_id: str | None = None, max_cpus: int = 2
    ) -> Settings:
        return Settings(
            data_dir=tmp_path / name, database_url=fleet_url, host_id=host_id or name,
            heartbeat_interval=0.2, host_lost_after=LOST_AFTER, ip_timeout=5.0,
            download_timeout=5.0, callback_schedule=(0, 0.05, 0.1),
            limits=Limits(max_vms=max_vms, max_cpus=max_cpus),
        )  # fmt: skip

    return settings


@contextlib.asynccontextmanager
async def hosts(*services: Service) -> AsyncIterator[tuple[Service, ...]]:
    async with contextlib.AsyncExitStack() as stack:
        yield tuple([await stack.enter_async_context(serving(s)) for s in services])


async def listed_hosts(service: Service) -> dict[str, dict[str, Any]]:
    response = await service.client.get("/hosts")
    assert response.status_code == 200, response.text
    return {host["id"]: host for host in response.json()["hosts"]}


async def until_lost(service: Service, host_id: str) -> dict[str, Any]:
    async with asyncio.timeout(LOST_AFTER * 4):
        while (found := (await listed_hosts(service))[host_id])["state"] != "lost":
            await asyncio.sleep(0.1)
    return found


async def test_hosts_that_start_at_once_migrate_a_new_database_one_after_another(
    fleet_url: str,
) -> None:
    dbs = [Database(fleet_url, f"host-{i}") for i in range(3)]
    try:
        await asyncio.gather(*(db.open() for db in dbs))
        assert [await db.read(lambda c: vm_records.of_host(c, None)) for db in dbs] == [[]] * 3
    finally:
        for db in dbs:
            await db.close()


@pytest.fixture
async def listening(fleet_url: str) -> AsyncIterator[tuple[Database, Database]]:
    """Two hosts' stores on one database, the second listening for the first's commits."""
    first, second = Database(fleet_url, "host-a"), Database(fleet_url, "host-b")
    await first.open()
    await second.open()
    listener = ChangeListener(fleet_url, second.changes)
    await listener.start()
    try:
        yield first, second
    finally:
        await listener.close()
        await first.close()
        await second.close()


async def test_a_commit_on_one_host_wakes_the_waiters_of_another(
    listening: tuple[Database, Database],
) -> None:
    first, second = listening
    seen = second.changes.version
    pool = Pool(
        name="p",
        image=ImageSpec(url="http://x/", checksum="0" * 64),
        cpus=1,
        memory=256,
        network_type="nat",
        size=0,
        created_at="2026-12-02T00:00:00Z",
    )
    await first.write(lambda c: pool_records.put(c, pool, "host-a"))
    async with asyncio.timeout(5):
        await second.changes.wait(seen, 5)
    assert second.changes.version > seen  # woken by the notification, not the timeout


async def test_another_hosts_commit_wakes_on_this_host_only_who_waits_for_what_it_touched(
    listening: tuple[Database, Database],
) -> None:
    """Host b hears every commit of host a (its ``LISTEN``), but its own work (a watch of
    ``host:host-b``, as its loop that takes the creates placed on it has) wakes only for a VM
    of b's, and a waiter for one VM only for that VM."""
    here, there = listening
    mine = make_vm().model_copy(update={"host": "host-b"})
    with (
        there.changes.watching(event_log.host_subject("host-b")) as work,
        there.changes.watching(mine.id) as waiter,
    ):
        heard = there.changes.version
        await here.write(lambda conn: vm_records.add(conn, make_vm(), {}))  # a's own VM
        async with asyncio.timeout(10):
            while there.changes.version == heard:  # b heard it...
                await asyncio.sleep(0.01)
        assert not await work.wait(0) and not await waiter.wait(0)  # ...and woke no one
        await here.write(lambda conn: vm_records.add(conn, mine, {}))  # placed on b
        assert await work.wait(10) and await waiter.wait(0)


async def test_every_host_lists_the_fleet_with_what_each_holds_and_its_heartbeat(
    host_settings: Any, images: FileServer
) -> None:
    first = Service(host_settings("host-a", max_vms=2))
    second = Service(dataclasses.replace(host_settings("b"), host_id=None))
    async with hosts(first, second) as (a, b):
        await a.boot({"image": image_of(images), "cpus": 1, "memory": 256})
        made = (a.settings.data_dir / HOST_ID_FILE).exists(), b.settings.data_dir / HOST_ID_FILE
        assert made[0] is False and made[1].exists()  # configured, or made and kept
        b_id = made[1].read_text().strip()
        listed = await listed_hosts(b)
        assert set(listed) == {"host-a", b_id}
        host_a = listed["host-a"]
        assert host_a["state"] == "up" and host_a["driver"] == "synthetic"
        assert host_a["capacity"]["vms"] == 2 and host_a["used"] == {"vms": 1, "cpus": 1,
                                                                     "memory": 256}  # fmt: skip
        assert host_a["free"]["vms"] == 1 and host_a["free"]["cpus"] is None  # no total set
        assert listed[b_id]["used"]["vms"] == 0 and listed[b_id]["free"]["vms"] is None
        async with asyncio.timeout(5):  # it keeps beating
            while (await listed_hosts(b))["host-a"]["heartbeat_at"] == host_a["heartbeat_at"]:
                await asyncio.sleep(0.05)
    async with serving(Service(dataclasses.replace(host_settings("b"), host_id=None))) as again:
        assert b_id in await listed_hosts(again)  # the same ID after a restart


async def test_a_vm_made_on_one_host_is_read_waited_for_and_deleted_through_another(
    host_settings: Any, images: FileServer
) -> None:
    first, second = Service(host_settings("host-a")), Service(host_settings("host-b"))
    async with hosts(first, second) as (a, b):
        vm = await a.post_vm({"image": image_of(images), "cpus": 1, "memory": 256})
        assert vm["host"] == "host-a"
        waited = await b.client.get(f"/vms/{vm['id']}?wait=true&timeout=20")
        assert waited.json()["status"] == "running", waited.text  # heard from host a's commits
        [listed] = (await b.client.get("/vms")).json()["vms"]
        assert listed["status"] == "running" and listed["ip_address"]  # b's driver never asked
        console = await b.client.get(f"/vms/{vm['id']}/console")
        assert console.status_code == 404 and "host-a" in console.json()["message"]

        assert (await b.client.delete(f"/vms/{vm['id']}")).status_code == 204
        assert a.leftovers(vm["id"]) == []  # host a destroyed it before b answered
        assert (await a.client.get(f"/vms/{vm['id']}")).status_code == 404


async def test_a_create_goes_to_a_host_with_room_and_each_host_reconciles_only_its_own(
    host_settings: Any, images: FileServer
) -> None:
    body = {"image": image_of(images), "cpus": 1, "memory": 256}
    first = Service(host_settings("host-a", max_vms=1))
    second = Service(host_settings("host-b", max_vms=1))
    async with hosts(first, second) as (a, b):
        mine = await a.boot(body)
        assert mine["host"] == "host-a"  # both empty: the host that was asked
        placed = await a.post_vm(body)
        assert placed["host"] == "host-b"  # host a is full
        waited = (await a.client.get(f"/vms/{placed['id']}?wait=true&timeout=20")).json()
        assert waited["status"] == "running", waited
        assert placed["id"] in second.host.machines and placed["id"] not in first.host.machines
        refused = await b.client.post("/vms", json=body)
        assert refused.status_code == 409 and refused.json()["code"] == "capacity-exceeded"
        message = refused.json()["message"]
        assert "host-a allows 1 VMs" in message and "host-b allows 1 VMs" in message
    # host b alone, started again: it adopts its own VM and leaves host a's as they are
    async with serving(Service(host_settings("host-b", max_vms=1), host=second.host)) as b:
        vms = {vm["id"]: vm for vm in (await b.client.get("/vms")).json()["vms"]}
        assert vms[placed["id"]]["status"] == "running"
        assert first.host.machines[mine["id"]].running  # host b's checks never touched it
        seen = (await b.client.get(f"/vms/{mine['id']}")).json()["status"]
        assert seen in {"running", "unknown"}  # unknown once host a's heartbeat is old


async def test_a_create_goes_to_the_host_that_holds_its_image(
    host_settings: Any, images: FileServer
) -> None:
    other, third = image_of(images, "other.raw"), image_of(images, "third.raw")
    first, second = Service(host_settings("host-a")), Service(host_settings("host-b"))
    async with hosts(first, second) as (a, b):
        await a.boot({"image": image_of(images), "cpus": 1, "memory": 256})  # a: 1 VM, b: 0
        assert (await b.client.post("/images", json=other)).status_code == 202
        async with asyncio.timeout(10):  # held, and said so in b's next heartbeat
            while f"sha256-{other['checksum']}" not in (await listed_hosts(a))["host-b"]["images"]:
                await asyncio.sleep(0.05)
        same = await b.boot({"image": image_of(images), "cpus": 1, "memory": 256})
        assert same["host"] == "host-a"  # its image, though host a has more VMs
        held = await a.boot({"image": other, "cpus": 1, "memory": 256})
        assert held["host"] == "host-b" and held["image_from_cache"] is True
        pack = Service(dataclasses.replace(host_settings("host-c"), placement="pack"))
        async with serving(pack) as c:
            packed = await c.boot({"image": third, "cpus": 1, "memory": 256})
            assert packed["host"] == "host-a"  # no host holds it: the one with the most VMs


async def test_a_lost_hosts_vms_are_unknown_until_it_comes_back_or_is_forgotten(
    host_settings: Any, images: FileServer
) -> None:
    body = {"image": image_of(images), "cpus": 1, "memory": 256}
    first, second = Service(host_settings("host-a")), Service(host_settings("host-b"))
    async with serving(second) as b:
        async with serving(first) as a:
            kept, ended = await a.boot(body), await a.boot(body)
        # host a stopped: its heartbeat with it; its guests run on
        lost = await until_lost(b, "host-a")
        vm = (await b.client.get(f"/vms/{kept['id']}")).json()
        assert vm["status"] == "unknown" and "host-a" in vm["status_reason"], vm
        assert lost["heartbeat_at"] in vm["status_reason"]
        refused = await b.client.delete(f"/vms/{kept['id']}")
        assert refused.status_code == 409 and refused.json()["code"] == "host-lost"
        patched = await b.client.patch(f"/vms/{kept['id']}", json={"labels": {"a": "b"}})
        assert patched.status_code == 409
        up = await b.client.delete("/hosts/host-b")
        assert up.status_code == 409 and up.json()["code"] == "host-up"

        async with serving(Service(host_settings("host-a"), host=first.host)) as a:
            assert (await listed_hosts(b))["host-a"]["state"] == "up"
            vm = (await b.client.get(f"/vms/{kept['id']}")).json()
            assert vm["status"] == "running" and vm["status_reason"] is None  # adopted
            assert (await b.client.delete(f"/vms/{kept['id']}")).status_code == 204
            assert a.leftovers(kept["id"]) == []

        await until_lost(b, "host-a")
        assert (await b.client.delete("/hosts/host-a")).status_code == 204
        assert "host-a" not in await listed_hosts(b)
        vm = (await b.client.get(f"/vms/{ended['id']}")).json()
        assert vm["status"] == "error" and vm["error"]["code"] == "host-lost", vm
        assert (await b.client.delete(f"/vms/{ended['id']}")).status_code == 204
        assert (await b.client.get(f"/vms/{ended['id']}")).status_code == 404
        missing = await b.client.delete("/hosts/host-a")
        assert missing.status_code == 404 and missing.json()["code"] == "host-not-found"


async def test_a_pool_made_changed_and_removed_through_one_host_is_kept_by_every_host(
    host_settings: Any, images: FileServer
) -> None:
    pool = {"image": image_of(images), "cpus": 1, "memory": 256, "size": 1}
    first, second = Service(host_settings("host-a")), Service(host_settings("host-b"))
    async with hosts(first, second) as (a, b):
        await a.put_pool("ci", pool)
        async with asyncio.timeout(10):  # host b hears of it
            while (await b.client.get("/pools/ci")).status_code == 404:
                await asyncio.sleep(0.05)
        await b.wait_pool("ci", 1, timeout=20)  # and fills its own
        await a.wait_pool("ci", 1, timeout=20)
        await b.put_pool("ci", pool | {"size": 2})  # a pool's size is per host
        for service in (a, b):
            await service.wait_pool("ci", 2, timeout=20)
            assert len(pooled(service)) == 2
        assert (await a.client.delete("/pools/ci")).status_code == 204
        async with asyncio.timeout(20):
            while pooled(b):  # host b removes its machines once it hears of it
                await asyncio.sleep(0.05)
        assert (await b.client.get("/pools/ci")).status_code == 404
        assert pooled(a) == set()


async def test_a_create_goes_to_a_host_whose_bounds_take_it_and_is_refused_if_none_does(
    host_settings: Any, images: FileServer
) -> None:
    body = {"image": image_of(images), "cpus": 4, "memory": 256}
    small = Service(host_settings("host-a", max_cpus=2))
    large = Service(host_settings("host-b", max_cpus=4))
    async with serving(small) as a:
        async with serving(large) as b:
            vm = await a.boot(body)  # host a would not take 4 CPUs; host b does
            assert vm["host"] == "host-b" and vm["status"] == "running", vm
            refused = await b.client.post("/vms", json=body | {"cpus": 8})
            assert refused.status_code == 400 and refused.json()["code"] == "invalid-request"
            assert refused.json()["message"] == (
                "no host that is up takes this VM: cpus: must be between 1 and 2 on host-a; "
                "cpus: must be between 1 and 4 on host-b"
            )
        await until_lost(a, "host-b")
        alone = await a.client.post("/vms", json=body)  # host b is lost: no host takes it
        assert alone.status_code == 400
        assert alone.json()["message"] == "cpus: must be between 1 and 2 on this host"


async def test_a_groups_vms_go_to_the_host_that_has_its_members(
    host_settings: Any, images: FileServer
) -> None:
    body = {"image": image_of(images), "cpus": 1, "memory": 256}
    first = Service(host_settings("host-a", max_vms=2))
    second = Service(host_settings("host-b", max_vms=2))
    async with hosts(first, second) as (a, b):
        for host in (a, b):  # both hold the image, so that spread alone would choose
            assert (await host.client.post("/images", json=body["image"])).status_code == 202
        async with asyncio.timeout(10):
            while any(f"sha256-{body['image']['checksum']}" not in h["images"]
                      for h in (await listed_hosts(a)).values()):  # fmt: skip
                await asyncio.sleep(0.05)
        member = await a.boot({**body, "network_group": "job-41"})
        assert member["host"] == "host-a" and member["network_group"] == "job-41"
        other = await b.boot(body)  # spread: host b has fewer VMs now
        assert other["host"] == "host-b"
        joined = await b.boot({**body, "network_group": "job-41"})
        assert joined["host"] == "host-a"  # though host b has as many VMs
        refused = await b.client.post("/vms", json={**body, "network_group": "job-41"})
        assert refused.status_code == 409, refused.text  # its host is full; b has room
        assert refused.json()["code"] == "capacity-exceeded"
        assert "host-a allows 2 VMs" in refused.json()["message"]
        elsewhere = await b.boot({**body, "network_group": "job-42"})
        assert elsewhere["host"] == "host-b"


async def test_a_tenants_vm_is_its_own_through_every_host(
    host_settings: Any, images: FileServer
) -> None:
    """Tenancy is the VM record's: another tenant's token gets a 404 through any host, its
    own token the VM through any host."""
    named = (Token("alice", digest_of("alice-secret-0123456"), Role.USER, "team-a"),
             Token("bob", digest_of("bob-secret-0123456789"), Role.USER, "team-b"))  # fmt: skip
    alice = {"Authorization": "Bearer alice-secret-0123456"}
    bob = {"Authorization": "Bearer bob-secret-0123456789"}
    first, second = (Service(dataclasses.replace(host_settings(name), tokens=named))
                     for name in ("host-a", "host-b"))  # fmt: skip
    async with hosts(first, second) as (a, b):
        body = {"image": image_of(images), "cpus": 1, "memory": 256}
        made = await a.client.post("/vms", json=body, headers=alice)
        vm = made.json()
        assert made.status_code == 202 and vm["host"] == "host-a", made.text
        waited = await b.client.get(f"/vms/{vm['id']}?wait=true&timeout=20", headers=alice)
        assert waited.json()["status"] == "running", waited.text
        for service in (a, b):
            assert (await service.client.get(f"/vms/{vm['id']}", headers=bob)).status_code == 404
            assert (await service.client.get("/vms", headers=bob)).json()["vms"] == []
            gone = await service.client.delete(f"/vms/{vm['id']}", headers=bob)
            assert gone.status_code == 404
        assert (await b.client.delete(f"/vms/{vm['id']}", headers=alice)).status_code == 204
