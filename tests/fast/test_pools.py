"""Warm pools through the API, on the synthetic driver: filling, claims (atomic, with the
request's identity), refills, capacity, restarts, changes and removal, and pools that cannot
fill. In-process, no root."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from goldclone.drivers.synthetic import SyntheticHost
from goldclone.egress import Reach
from goldclone.guest.config import GuestConfig
from goldclone.polling import until
from goldclone.service.catalog import Catalog
from goldclone.settings import Limits, Settings
from tests.fast.conftest import DISK, Service, serving
from tests.fast.test_templates import phases
from tests.servers import FileServer


def pool_body(request_body: dict[str, Any], size: int = 2, **changes: Any) -> dict[str, Any]:
    return {"image": request_body["image"], "cpus": 1, "memory": 256, "size": size} | changes


def pooled(service: Service, name: str = "ci") -> set[str]:
    """The machines on the host that wear the pool's placeholder hostname."""
    return {
        machine.name
        for machine in service.host.machines.values()
        if machine.personalized is not None and machine.personalized.hostname == f"pool-{name}"
    }


async def pool_error(service: Service, name: str) -> dict[str, Any]:
    """The pool once it has an error."""
    async with asyncio.timeout(10):
        while (pool := (await service.client.get(f"/pools/{name}")).json())["error"] is None:
            await asyncio.sleep(0.01)
    return dict(pool)


async def test_a_vm_claims_a_pooled_machine_with_its_own_identity_and_the_pool_refills(
    service: Service, request_body: dict[str, Any]
) -> None:
    response = await service.client.put("/pools/ci", json=pool_body(request_body))
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "filling"
    pool = await service.wait_pool("ci", 2)
    assert (pool["status"], pool["claimed"], pool["error"]) == ("ready", 0, None)
    members = pooled(service)
    assert len(members) == 2
    for member in members:  # restored from the pool's template, with new host keys
        machine = service.host.machines[member]
        assert machine.spec is not None and machine.spec.restore
        assert machine.personalizations == [True]

    body = {**request_body, "name": "job-1", "metadata": {"token": "s3cret"}}
    vm = await service.boot(body)
    assert (vm["started_from"], vm["pool"], vm["status"]) == ("pool", "ci", "running"), vm
    assert phases(vm) == ["accepted", "claimed", "running"]
    [claimed] = members - pooled(service)
    machine = service.host.machines[claimed]
    assert machine.personalized == GuestConfig(vm["id"], "job-1", (), None, {"token": "s3cret"})
    assert machine.personalizations == [True, False]  # no new host keys at the claim
    assert vm["ip_address"] == machine.ip and vm["mac_address"] == machine.runtime.mac

    refilled = await service.wait_pool("ci", 2)
    assert refilled["claimed"] == 1 and len(pooled(service) - members) == 1
    await service.delete(vm["id"])
    assert claimed not in service.host.machines
    assert not (service.settings.data_dir / "vms" / claimed).exists()


async def test_requests_that_do_not_match_a_pool_do_not_claim_from_it(
    service: Service, request_body: dict[str, Any]
) -> None:
    await service.put_pool("ci", pool_body(request_body, size=1))
    await service.wait_pool("ci", 1)
    for changes in ({"cpus": 2}, {"memory": 512}, {"network_type": "hostonly"},
                    {"start": "cold"}, {"headless": False},
                    {"user_data": "#cloud-config\n{}\n"}):  # fmt: skip
        vm = await service.boot({**request_body, **changes})
        assert vm["started_from"] != "pool", changes
    assert (await service.client.get("/pools/ci")).json()["claimed"] == 0


async def test_concurrent_creates_never_claim_one_machine_twice(
    service: Service, request_body: dict[str, Any]
) -> None:
    await service.put_pool("ci", pool_body(request_body, size=3))
    await service.wait_pool("ci", 3)
    members = pooled(service)
    service.host.boot_seconds = 30  # no refill or cold boot finishes during the test
    created = await asyncio.gather(*(service.post_vm(request_body) for _ in range(10)))
    claimed = [vm for vm in created if vm["started_from"] == "pool"]
    assert len(claimed) == 3
    ran = await asyncio.gather(*(service.wait_for(vm["id"], "running") for vm in claimed))
    machines = {vm["mac_address"] for vm in ran}
    assert len(machines) == 3
    assert {service.host.machines[m].runtime.mac for m in members} == machines


async def test_pooled_machines_count_against_the_hosts_capacity(
    fast_settings: Settings, request_body: dict[str, Any]
) -> None:
    settings = dataclasses.replace(fast_settings, limits=Limits(max_vms=3))
    async with serving(Service(settings)) as service:
        await service.put_pool("ci", pool_body(request_body, size=2))
        await service.wait_pool("ci", 2)
        other = await service.boot({**request_body, "cpus": 2})
        full = await service.client.post("/vms", json={**request_body, "cpus": 2})
        assert (full.status_code, full.json()["code"]) == (409, "capacity-exceeded")
        assert "warm pools" in full.json()["message"]
        claimed = await service.boot(request_body)  # a claim takes no more room
        assert claimed["started_from"] == "pool"
        pool = await pool_error(service, "ci")  # its refill finds no room
        assert pool["error"]["code"] == "capacity-exceeded" and pool["ready"] == 1
        await service.delete(other["id"])  # room for the refill
        refilled = await service.wait_pool("ci", 2)
        assert (refilled["status"], refilled["error"]) == ("ready", None)
        too_big = await service.client.put("/pools/big", json=pool_body(request_body, size=4))
        assert too_big.status_code == 400 and "size: this host allows 3 VMs" in too_big.text


async def test_pools_and_their_running_machines_survive_a_restart(
    fast_settings: Settings, request_body: dict[str, Any]
) -> None:
    host = SyntheticHost()
    async with serving(Service(fast_settings, host)) as first:
        await first.put_pool("ci", pool_body(request_body, size=2))
        await first.wait_pool("ci", 2)
        members = pooled(first)
        host.boot_seconds = 30
        await first.put_pool("ci", pool_body(request_body, size=3))  # one left filling
        async with asyncio.timeout(5):
            while len(host.machines) < 3:
                await asyncio.sleep(0.01)
        host.power_off(sorted(members)[0])  # as if it died while the service was down
    host.boot_seconds = 0
    async with serving(Service(fast_settings, host)) as restarted:
        kept = sorted(members)[1]
        assert kept in host.machines and sorted(members)[0] not in host.machines
        pool = await restarted.wait_pool("ci", 3)
        assert pool["size"] == 3 and kept in pooled(restarted)
        assert len(host.machines) == 3  # nothing of the cut-off restore is left


async def test_a_pool_replaces_a_machine_that_stopped(
    fast_settings: Settings, request_body: dict[str, Any]
) -> None:
    settings = dataclasses.replace(fast_settings, reconcile_interval=0.05)
    async with serving(Service(settings)) as service:
        await service.put_pool("ci", pool_body(request_body, size=1))
        await service.wait_pool("ci", 1)
        [first] = pooled(service)
        service.host.power_off(first)
        async with asyncio.timeout(5):
            while pooled(service) in (set(), {first}):
                await asyncio.sleep(0.01)
        assert first not in service.host.machines
        assert not (settings.data_dir / "vms" / first).exists()


async def test_changing_and_deleting_a_pool(service: Service, request_body: dict[str, Any]) -> None:
    await service.put_pool("ci", pool_body(request_body, size=3))
    await service.wait_pool("ci", 3)
    before = pooled(service)
    changed = await service.client.put("/pools/ci", json=pool_body(request_body, size=1))
    assert changed.status_code == 200 and changed.json()["size"] == 1
    await service.wait_pool("ci", 1)
    assert pooled(service) < before  # the oldest one stays
    await service.put_pool("ci", pool_body(request_body, size=1, cpus=2))
    await service.wait_pool("ci", 1)
    [reshaped] = pooled(service)
    assert reshaped not in before and service.host.machines[reshaped].spec.cpus == 2  # type: ignore[union-attr]

    claimed = await service.boot({**request_body, "cpus": 2})
    assert claimed["started_from"] == "pool"
    await service.wait_pool("ci", 1)
    [member] = pooled(service)
    assert (await service.client.delete("/pools/ci")).status_code == 204
    assert member not in service.host.machines
    assert not (service.settings.data_dir / "vms" / member).exists()
    assert (await service.client.get("/vms/" + claimed["id"])).json()["status"] == "running"
    assert (await service.client.get("/pools")).json() == {"pools": []}
    gone = await service.client.get("/pools/ci")
    assert (gone.status_code, gone.json()["code"]) == (404, "pool-not-found")


async def test_an_image_kept_by_a_pool_is_not_deleted(
    service: Service, request_body: dict[str, Any]
) -> None:
    await service.put_pool("ci", pool_body(request_body, size=1))
    await service.wait_pool("ci", 1)
    image_id = f"sha256-{request_body['image']['checksum']}"
    response = await service.client.delete(f"/images/{image_id}")
    assert (response.status_code, response.json()["code"]) == (409, "image-in-use")
    assert "warm pool(s) ci" in response.json()["message"]
    assert (await service.client.delete("/pools/ci")).status_code == 204
    assert (await service.client.delete(f"/images/{image_id}")).status_code == 204


@pytest.mark.parametrize(
    ("name", "changes", "message"),
    [
        ("Bad_Name", {}, "name: must be a DNS label"),
        ("ci", {"size": -1}, "size:"),
        ("ci", {"size": 257}, "size:"),
        ("ci", {"cpus": 1000}, "cpus: must be between"),
        ("ci", {"network_type": "wifi"}, "network_type:"),
        ("ci", {"colour": "red"}, "colour: unknown field"),
        ("ci", {"image": {"url": "http://127.0.0.1/x", "checksum": "zz"}}, "checksum"),
    ],
)
async def test_bad_pool_requests_get_400_and_make_nothing(
    service: Service, request_body: dict[str, Any], name: str, changes: dict[str, Any],
    message: str,
) -> None:  # fmt: skip
    response = await service.client.put(f"/pools/{name}", json=pool_body(request_body) | changes)
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "invalid-request" and message in response.json()["message"]
    assert (await service.client.get("/pools")).json() == {"pools": []}
    missing = await service.client.delete("/pools/nothing")
    assert (missing.status_code, missing.json()["code"]) == (404, "pool-not-found")


async def test_a_pool_whose_template_fails_says_why_and_restores_nothing(
    fast_settings: Settings, request_body: dict[str, Any]
) -> None:
    settings = dataclasses.replace(fast_settings, ready_timeout=0.5)
    async with serving(Service(settings, SyntheticHost(has_agent=False))) as service:
        await service.put_pool("ci", pool_body(request_body, size=1))
        pool = await pool_error(service, "ci")
        assert (pool["status"], pool["error"]["code"], pool["ready"]) == (
            "error", "template-failed", 0,
        )  # fmt: skip
        assert "not-ready" in pool["error"]["message"]
        vm = await service.boot(request_body)
        assert vm["started_from"] == "cold"


async def test_a_claim_with_a_group_or_egress_gives_the_pooled_machine_its_reach(
    service: Service, request_body: dict[str, Any]
) -> None:
    response = await service.client.put("/pools/ci", json=pool_body(request_body, size=1))
    assert response.status_code == 201, response.text
    await service.wait_pool("ci", 1)
    [member] = pooled(service)
    assert service.host.machines[member].reaches == [Reach()]  # a pool keeps the default

    vm = await service.boot({**request_body, "network_group": "job-9", "egress": "none"})
    assert (vm["started_from"], vm["network_group"], vm["egress"]) == ("pool", "job-9", "none")
    assert service.host.machines[member].reaches == [Reach(), Reach("default/job-9", ())]

    await service.wait_pool("ci", 1)
    plain = await service.boot(request_body)  # the default: nothing to change at the claim
    assert plain["started_from"] == "pool"
    [claimed] = [m for m in service.host.machines.values() if m.personalized
                 and m.personalized.instance_id == plain["id"]]  # fmt: skip
    assert claimed.reaches == [Reach()]


async def test_a_start_that_fails_after_the_pools_started_leaves_nothing_running(
    fast_settings: Settings,
    request_body: dict[str, Any],
    images: FileServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The parts that a start got going are stopped when a later part fails: here the pool's
    keeper is downloading its image (which never comes) when the start fails."""
    stalled = {**request_body["image"], "url": images.url(f"stall/{DISK}")}
    async with serving(Service(fast_settings)) as first:
        await first.put_pool("ci", pool_body(request_body, size=1, image=stalled))

    async def busy_then_failing(_: Catalog) -> None:
        await until(lambda: bool(_filling()), timeout=10, interval=0.01)
        raise RuntimeError("a part after the pools failed")

    monkeypatch.setattr(Catalog, "trim", busy_then_failing)
    before = asyncio.all_tasks()
    with pytest.raises(RuntimeError, match="after the pools failed"):
        async with serving(Service(fast_settings)):
            pass
    assert [task.get_name() for task in asyncio.all_tasks() - before if not task.done()] == []


def _filling() -> list[asyncio.Task[Any]]:
    """The tasks of this process that fetch an image or make a template."""
    return [task for task in asyncio.all_tasks()
            if task.get_name().startswith(("fetch ", "template ")) and not task.done()]  # fmt: skip
