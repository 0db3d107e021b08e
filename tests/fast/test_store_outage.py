"""A PostgreSQL store that is down, restarting or out of free connections: every route that
needs it answers 503 ``store-unavailable`` with ``Retry-After`` (never a 500), ``/readyz``
says so, and the service takes up its work by itself once the store is back, with nothing
lost. Against a real PostgreSQL server, stopped and started by the test."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from goldclone.doctor import Verdict, store_connections
from goldclone.drivers.synthetic import SyntheticHost
from goldclone.settings import StorePool
from goldclone.store.listener import asyncpg_dsn
from tests.fast.conftest import Service, serving, settings_on
from tests.postgres import PostgresCluster, running_cluster


@pytest.fixture
def own_cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL server of this test's own, which it may stop and start."""
    with running_cluster() as cluster:
        yield cluster


def assert_unavailable(response: Any, why: str = "") -> None:
    assert response.status_code == 503, response.text
    assert response.json()["code"] == "store-unavailable", response.text
    assert response.headers["Retry-After"] == "2"
    assert why in response.json()["message"]


async def test_a_store_that_goes_down_answers_503_and_is_taken_up_again_when_back(
    tmp_path: Path, own_cluster: PostgresCluster, request_body: dict[str, Any]
) -> None:
    url = await own_cluster.new_database()
    async with serving(Service(settings_on(tmp_path, url))) as service:
        before = await service.boot(request_body)
        await asyncio.to_thread(own_cluster.pause)
        try:
            assert_unavailable(await service.client.get("/vms"))
            assert_unavailable(await service.client.post("/vms", json=request_body))
            assert_unavailable(await service.client.get(f"/vms/{before['id']}"))
            ready = await service.client.get("/readyz")
            assert ready.status_code == 503 and not ready.json()["checks"]["store"]["ok"]
        finally:
            await asyncio.to_thread(own_cluster.resume)
        async with asyncio.timeout(20):  # the pool's dead connections go at their first use
            while (listed := await service.client.get("/vms")).status_code != 200:
                assert_unavailable(listed)
                await asyncio.sleep(0.1)
        assert [vm["id"] for vm in listed.json()["vms"]] == [before["id"]]  # nothing lost
        after = await service.boot(request_body)
        assert after["status"] == "running", after
        assert (await service.client.get("/readyz")).status_code == 200


@pytest.fixture
async def locked_vms(postgres: PostgresCluster) -> AsyncIterator[tuple[str, asyncpg.Connection]]:
    """A database, and a connection to it that may lock its tables."""
    url = await postgres.new_database()
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        yield url, connection
    finally:
        await connection.close()


async def test_a_request_that_gets_no_free_connection_in_time_is_answered_503(
    tmp_path: Path, locked_vms: tuple[str, asyncpg.Connection], request_body: dict[str, Any]
) -> None:
    url, locker = locked_vms
    settings = replace(settings_on(tmp_path, url), store_pool=StorePool(1, 0, 0.3))
    async with serving(Service(settings)) as service:
        vm = await service.boot(request_body)
        transaction = locker.transaction()
        await transaction.start()
        await locker.execute("LOCK TABLE vms IN ACCESS EXCLUSIVE MODE")
        first = asyncio.ensure_future(service.client.get("/vms"))  # holds the one connection
        try:
            async with asyncio.timeout(10):
                while not await locker.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'vms'::regclass"
                ):
                    await asyncio.sleep(0.01)
            second = await service.client.get(f"/vms/{vm['id']}")
            assert_unavailable(second, "no connection was free within 0.3 s")
        finally:
            await transaction.rollback()
        assert (await first).status_code == 200
        assert (await service.client.get(f"/vms/{vm['id']}")).status_code == 200


async def test_doctor_checks_that_every_hosts_connections_fit_the_server(
    tmp_path: Path, postgres: PostgresCluster
) -> None:
    """The suite's server has max_connections 200 and reserves 3: at the defaults (11 a host)
    17 hosts fit; two hosts known to the store and this one, of 70 each, do not."""
    url = await postgres.new_database()
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await connection.execute("CREATE TABLE hosts (id text)")
        await connection.execute("INSERT INTO hosts VALUES ('a'), ('b')")
    finally:
        await connection.close()
    settings = replace(settings_on(tmp_path, url), driver="synthetic")
    fine = await store_connections(settings)
    assert fine.verdict is Verdict.OK, fine
    assert fine.found == (
        "3 host(s) x 11 connections = 33, of the server's 197 (max_connections 200 less 3 reserved)"
    )
    big = await store_connections(replace(settings, store_pool=StorePool(40, 29, 10.0)))
    assert big.verdict is Verdict.PROBLEM and "= 210, of the server's 197" in big.found
    assert "PgBouncer" in big.fix
    gone = await store_connections(replace(settings, database_url=url + "x"))
    assert gone.verdict is Verdict.PROBLEM and "cannot be reached" in gone.found


async def test_a_create_in_flight_waits_for_the_store_and_ends_running_when_it_is_back(
    tmp_path: Path,
    own_cluster: PostgresCluster,
    request_body: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="goldclone.store.database")
    url = await own_cluster.new_database()
    host = SyntheticHost(boot_seconds=1.0)
    async with serving(Service(settings_on(tmp_path, url), host)) as service:
        vm = await service.post_vm(request_body)
        await service.wait_for_phase(vm["id"], "booting")
        await asyncio.to_thread(own_cluster.pause)
        try:
            async with asyncio.timeout(20):  # its guest booted; its next step found no store
                while "work in flight waits" not in caplog.text:
                    await asyncio.sleep(0.05)
        finally:
            await asyncio.to_thread(own_cluster.resume)
        done = await service.wait_for(vm["id"], "running", "error", timeout=30)
        assert done["status"] == "running", done
        assert service.host.running() == {vm["id"]}
