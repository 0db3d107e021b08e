"""The API and the VM service on the synthetic driver: admission, idempotency, capacity,
errors and the state machine. In-process, no root, no QEMU."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from goldclone.drivers.base import MachineSpec, Runtime
from goldclone.drivers.synthetic import Machine, SyntheticDriver, SyntheticHost
from goldclone.errors import BootFailed, CloneFailed, DataDirInUse, NetworkFailed, VMConflict
from goldclone.guest.config import GuestConfig
from goldclone.settings import Limits, Settings
from tests.fast.conftest import Service, image_of, serving
from tests.harness import Goldclone
from tests.servers import CallbackReceiver, FileServer


def phases(vm: dict[str, Any]) -> list[str]:
    return [entry["phase"] for entry in vm["timeline"]]


async def test_create_run_list_and_delete(service: Service, request_body: dict[str, Any]) -> None:
    vm = await service.boot(request_body)
    assert vm["status"] == "running", vm
    assert vm["ip_address"].startswith("198.1")
    assert vm["mac_address"] == service.host.machines[vm["id"]].runtime.mac  # type: ignore[union-attr]
    assert phases(vm) == ["accepted", "downloading", "cloning", "booting", "running"]
    listed = (await service.client.get("/vms")).json()["vms"]
    assert [v["id"] for v in listed] == [vm["id"]]
    second = await service.boot(request_body)
    assert "downloading" not in phases(second)  # the gold image is cached
    assert second["ip_address"] != vm["ip_address"] and second["mac_address"] != vm["mac_address"]
    for each in (vm, second):
        response = await service.client.delete(f"/vms/{each['id']}")
        assert response.status_code == 204 and response.content == b""
        assert (await service.client.get(f"/vms/{each['id']}")).status_code == 404
        assert service.leftovers(each["id"]) == []
    images = (await service.client.get("/images")).json()["images"]
    assert [(i["status"], i["vms"]) for i in images] == [("ready", 0)]


async def test_bad_requests_get_clear_errors(
    service: Service, request_body: dict[str, Any]
) -> None:
    cases = [
        ({**request_body, "cpus": 1000}, "invalid-request", "cpus: must be between 1 and"),
        ({**request_body, "network_type": "bridged"}, "invalid-request", "not offered"),
        ({**request_body, "memory": "lots"}, "invalid-request", "memory:"),
        ({**request_body, "colour": "red"}, "invalid-request", "colour: unknown field"),
        (
            {**request_body, "image": {**request_body["image"], "url": "http://169.254.169.254/"}},
            "invalid-request",
            "image.url:",
        ),
    ]
    for body, code, message in cases:
        response = await service.client.post("/vms", json=body)
        assert response.status_code == 400, response.text
        assert response.json()["code"] == code
        assert message in response.json()["message"], response.json()
    assert (await service.client.get("/vms")).json()["vms"] == []
    broken = await service.client.post(
        "/vms", content=b"{", headers={"Content-Type": "application/json"}
    )
    assert broken.status_code == 400 and broken.json()["code"] == "invalid-json"
    for path, status, code in (
        ("/vms/not-an-id", 404, "vm-not-found"),
        (f"/vms/{uuid.uuid4()}", 404, "vm-not-found"),
        ("/nowhere", 404, "not-found"),
    ):
        response = await service.client.get(path)
        assert (response.status_code, response.json()["code"]) == (status, code)
    response = await service.client.put("/vms")
    assert response.status_code == 405 and response.headers["allow"] == "GET, POST"


async def test_an_idempotency_key_makes_one_vm(
    service: Service, request_body: dict[str, Any]
) -> None:
    key = {"Idempotency-Key": "build-42"}
    answers = await asyncio.gather(
        *(service.client.post("/vms", json=request_body, headers=key) for _ in range(10))
    )
    assert {a.status_code for a in answers} == {202}
    assert len({a.json()["id"] for a in answers}) == 1
    assert len((await service.client.get("/vms")).json()["vms"]) == 1
    other = await service.client.post("/vms", json={**request_body, "cpus": 2}, headers=key)
    assert other.status_code == 409 and other.json()["code"] == "idempotency-conflict"
    assert len(service.host.machines) <= 1  # the repeats started nothing


async def test_an_idempotency_key_is_its_vms_until_the_vm_is_deleted(
    service: Service, request_body: dict[str, Any]
) -> None:
    key = {"Idempotency-Key": "build-4711"}
    first = (await service.client.post("/vms", json=request_body, headers=key)).json()
    other_key = {"Idempotency-Key": "build-4712"}
    fresh = await service.client.post("/vms", json=request_body, headers=other_key)
    assert fresh.status_code == 202 and fresh.json()["id"] != first["id"]
    await service.delete(first["id"])
    reused = await service.client.post("/vms", json=request_body, headers=key)
    assert reused.status_code == 202 and reused.json()["id"] not in {
        first["id"],
        fresh.json()["id"],
    }
    too_long = {"Idempotency-Key": "k" * 256}
    assert (
        await service.client.post("/vms", json=request_body, headers=too_long)
    ).status_code == 400


async def test_host_totals_refuse_with_409_naming_what_is_short_before_allocating(
    fast_settings: Settings, request_body: dict[str, Any]
) -> None:
    limits = Limits(max_cpus=2, total_cpus=3, total_memory_mb=1024)
    async with serving(Service(replace(fast_settings, limits=limits))) as limited:
        first = await limited.client.post("/vms", json={**request_body, "cpus": 2})
        assert first.status_code == 202
        for changes, short in (({"cpus": 2}, "vCPUs"), ({"memory": 1000}, "memory")):
            over = await limited.client.post("/vms", json={**request_body, **changes})
            assert (over.status_code, over.json()["code"]) == (409, "capacity-exceeded")
            assert short in over.json()["message"]
        assert len((await limited.client.get("/vms")).json()["vms"]) == 1
        assert set(limited.host.machines) <= {first.json()["id"]}


async def test_capacity_is_never_exceeded(
    fast_settings: Settings, request_body: dict[str, Any]
) -> None:
    limits = Limits(max_vms=3)
    async with serving(Service(replace(fast_settings, limits=limits))) as limited:
        answers = await asyncio.gather(
            *(limited.client.post("/vms", json=request_body) for _ in range(8))
        )
        accepted = [a.json() for a in answers if a.status_code == 202]
        refused = [a.json() for a in answers if a.status_code == 409]
        assert (len(accepted), len(refused)) == (3, 5)
        assert {r["code"] for r in refused} == {"capacity-exceeded"}
        assert "this host allows 3 VMs in all" in refused[0]["message"]
        await limited.wait_for(accepted[0]["id"], "running")
        await limited.client.delete(f"/vms/{accepted[0]['id']}")
        assert (await limited.client.post("/vms", json=request_body)).status_code == 202


async def test_a_failed_step_ends_in_error_with_nothing_left(
    service: Service, request_body: dict[str, Any], callbacks: CallbackReceiver
) -> None:
    body = {**request_body, "callback_url": callbacks.url}
    service.host.fail_next("clone", CloneFailed("no room for the clone"))
    failed = await service.boot(body)
    assert failed["error"] == {"code": "clone-failed", "message": "no room for the clone"}
    assert phases(failed)[-1] == "error" and service.leftovers(failed["id"]) == []
    service.host.fail_next("start", BootFailed("the hypervisor would not start"))
    failed = await service.boot(body)
    assert failed["error"]["code"] == "boot-failed" and service.leftovers(failed["id"]) == []
    received = await asyncio.to_thread(callbacks.wait_for, 2, 5)
    assert [b["error"]["code"] for b in received] == ["clone-failed", "boot-failed"]


async def test_a_guest_without_an_address_times_out(
    fast_settings: Settings, request_body: dict[str, Any]
) -> None:
    host = SyntheticHost(gets_ip=False)
    async with serving(Service(replace(fast_settings, ip_timeout=0.2), host)) as impatient:
        vm = await impatient.boot(request_body)
        assert vm["error"]["code"] == "ip-timeout" and impatient.leftovers(vm["id"]) == []


async def test_a_hypervisor_that_exits_while_booting_is_a_boot_failure(
    service: Service, request_body: dict[str, Any]
) -> None:
    service.host.boot_seconds = 30
    vm = await service.post_vm(request_body)
    await _until_started(service, vm["id"])
    service.host.power_off(vm["id"])
    failed = await service.wait_for(vm["id"], "error")
    assert failed["error"]["code"] == "boot-failed"
    assert "exited before the guest got an IP" in failed["error"]["message"]


async def test_a_guest_that_powers_off_is_stopped(
    service: Service, request_body: dict[str, Any]
) -> None:
    vm = await service.boot(request_body)
    service.host.power_off(vm["id"])
    stopped = (await service.client.get(f"/vms/{vm['id']}")).json()
    assert stopped["status"] == "stopped" and phases(stopped)[-1] == "stopped"
    assert (await service.client.delete(f"/vms/{vm['id']}")).status_code == 204
    assert service.leftovers(vm["id"]) == []


async def test_delete_cuts_a_create_off(service: Service, request_body: dict[str, Any]) -> None:
    service.host.boot_seconds = 30
    vm = await service.post_vm(request_body)
    await _until_started(service, vm["id"])
    assert (await service.client.delete(f"/vms/{vm['id']}")).status_code == 204
    assert service.leftovers(vm["id"]) == []
    assert (await service.client.get(f"/vms/{vm['id']}")).status_code == 404


async def test_a_refused_destroy_keeps_the_vm_as_it_was(
    service: Service, request_body: dict[str, Any]
) -> None:
    vm = await service.boot(request_body)
    service.host.fail_next("destroy", VMConflict("the hypervisor holds a lock on the VM"))
    response = await service.client.delete(f"/vms/{vm['id']}")
    assert response.status_code == 409 and response.json()["code"] == "vm-conflict"
    kept = (await service.client.get(f"/vms/{vm['id']}")).json()
    assert kept == vm
    assert (await service.client.delete(f"/vms/{vm['id']}")).status_code == 204


async def test_concurrent_deletes_destroy_once(
    service: Service, request_body: dict[str, Any]
) -> None:
    vm = await service.boot(request_body)
    answers = await asyncio.gather(*(service.client.delete(f"/vms/{vm['id']}") for _ in range(5)))
    assert sorted(a.status_code for a in answers) == [204, 404, 404, 404, 404]


async def test_bad_images_end_in_error(service: Service, images: FileServer) -> None:
    wrong = {"url": images.url("disk.raw"), "checksum": "0" * 64}
    missing = {**image_of(images), "url": images.url("missing.raw")}
    for image, code, said in ((wrong, "checksum-mismatch", "0" * 64),
                              (missing, "download-failed", "404")):  # fmt: skip
        vm = await service.boot({"image": image, "cpus": 1, "memory": 256})
        assert vm["error"]["code"] == code and said in vm["error"]["message"], vm
        assert service.leftovers(vm["id"]) == []
        assert str(service.settings.data_dir.absolute()) not in vm["error"]["message"]
    assert list((service.settings.data_dir / "downloads").iterdir()) == []
    assert list((service.settings.data_dir / "images").iterdir()) == []


async def test_a_restart_adopts_running_vms_and_ends_interrupted_creates(
    fast_settings: Settings, request_body: dict[str, Any]
) -> None:
    host = SyntheticHost()
    async with serving(Service(fast_settings, host)) as first:
        running = await first.boot(request_body)
        host.boot_seconds = 30
        creating = await first.post_vm(request_body)
        await _until_started(first, creating["id"])
    host.machines.setdefault("orphan", Machine("orphan", "gold")).running = True

    async with serving(Service(fast_settings, host)) as restarted:
        assert (await restarted.client.get(f"/vms/{running['id']}")).json() == running
        interrupted = await restarted.wait_for(creating["id"], "error")
        assert interrupted["error"]["code"] == "interrupted"
        assert restarted.leftovers(creating["id"]) == []
        async with asyncio.timeout(5):
            while "orphan" in restarted.host.machines:  # the reconcile at start removes it
                await asyncio.sleep(0.01)
        assert set(restarted.host.machines) == {running["id"]}


async def test_the_synthetic_driver_keeps_the_contract(tmp_path: Path, images: FileServer) -> None:
    """Out of order calls fail as a real hypervisor's would, and removal is safe to repeat."""
    driver = SyntheticDriver(tmp_path)
    await driver.prepare()
    with pytest.raises(BootFailed, match="never cloned"):
        await driver.start(
            MachineSpec("m", 1, 256, True, GuestConfig("m", "m")),
            Runtime("m", "nat", "02:00:00:00:00:01"),
        )
    await driver.destroy("m", None)
    await driver.destroy("m", None)
    assert list((tmp_path / "vms").iterdir()) == []


async def _until_started(service: Service, vm_id: str) -> None:
    async with asyncio.timeout(5):
        while not (vm_id in service.host.machines and service.host.machines[vm_id].running):
            await asyncio.sleep(0.01)


async def test_a_second_service_on_a_data_dir_refuses_to_start(
    service: Service, request_body: dict[str, Any]
) -> None:
    vm = await service.boot(request_body)
    second = Service(service.settings)
    with pytest.raises(
        DataDirInUse, match=rf"in use by another goldclone service \(PID {os.getpid()}\)"
    ):
        async with serving(second):
            pass
    assert (await service.client.get(f"/vms/{vm['id']}")).json() == vm
    assert second.host.machines == {}


async def test_gold_images_of_the_first_format_are_upgraded(
    fast_settings: Settings, request_body: dict[str, Any]
) -> None:
    """gold.json without a version, as made up to 8682a97 (and without its url and size, as
    before 2a3b13e), is upgraded at start; the image stays and is used as it was."""
    async with serving(Service(fast_settings)) as first:
        await first.boot(request_body)
    (gold,) = (fast_settings.data_dir / "images").glob("sha256-*")
    meta = gold / "gold.json"
    old = {k: v for k, v in json.loads(meta.read_text()).items() if k in ("disk", "format", "vmx")}
    gold.chmod(0o755)
    meta.chmod(0o644)
    meta.write_text(json.dumps(old))
    gold.chmod(0o555)

    async with serving(Service(fast_settings)) as upgraded:
        (image,) = (await upgraded.client.get("/images")).json()["images"]
        assert image["status"] == "ready" and image["size_bytes"] > 0
        vm = await upgraded.boot(request_body)
        assert vm["status"] == "running" and "downloading" not in phases(vm)
    upgraded_meta = json.loads(meta.read_text())
    assert upgraded_meta["version"] == 3
    assert (
        upgraded_meta["disk_sha256"]
        == hashlib.sha256((gold / old["disk"]).read_bytes()).hexdigest()
    )
    assert oct(meta.stat().st_mode & 0o777) == "0o444"


async def test_cleanup_trouble_never_keeps_a_vm(
    fast_settings: Settings, request_body: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A teardown that fails (a lease that cannot be released, say) does not fail the DELETE:
    the VM is forgotten, and reconciliation retries what is left until it is gone."""
    host = SyntheticHost()
    settings = replace(fast_settings, reconcile_interval=0.1)
    async with serving(Service(settings, host)) as service:
        vm = await service.boot(request_body)
        host.fail_next("destroy", NetworkFailed("could not release the lease of the guest"))
        caplog.set_level(logging.INFO, logger="goldclone")
        response = await service.client.delete(f"/vms/{vm['id']}")
        assert response.status_code == 204, response.text
        assert (await service.client.get(f"/vms/{vm['id']}")).status_code == 404

        def retried() -> list[str]:
            return [r.getMessage() for r in caplog.records if "of its cleanup" in r.getMessage()]

        async with asyncio.timeout(5):  # the retry's last step is its log line
            while not retried():
                await asyncio.sleep(0.01)
        assert service.leftovers(vm["id"]) == []
    assert retried() == [f"VM {vm['id']}: retry 1 of its cleanup removed what was left "
                         "(could not release the lease of the guest)"]  # fmt: skip


async def test_readyz_reports_each_part(service: Service) -> None:
    response = await service.client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"store": {"ok": True, "reason": None}}}


async def test_the_console_shows_what_the_guest_wrote(
    service: Service, request_body: dict[str, Any]
) -> None:
    vm = await service.boot(request_body)
    console = await service.client.get(f"/vms/{vm['id']}/console")
    assert console.status_code == 200
    assert console.headers["content-type"] == "text/plain; charset=utf-8"
    assert console.text == (
        f"synthetic machine {vm['id']} powered on, 1 CPU(s)\ngot the address {vm['ip_address']}\n"
    )
    missing = await service.client.get(f"/vms/{uuid.uuid4()}/console")
    assert (missing.status_code, missing.json()["code"]) == (404, "vm-not-found")


async def test_the_console_follows_until_the_vm_is_gone(
    fast_settings: Settings, request_body: dict[str, Any]
) -> None:
    """Streaming needs a real server (httpx's ASGI transport buffers whole answers): the
    loopback harness, on the synthetic driver."""
    server = Goldclone(replace(fast_settings, driver="synthetic"))
    await server.start()
    try:
        vm = await server.boot(request_body)
        path = fast_settings.data_dir / "vms" / vm["id"] / "console.log"
        url = f"/vms/{vm['id']}/console?follow=true"
        async with asyncio.timeout(20), server.client.stream("GET", url) as stream:
            chunks = stream.aiter_text()
            assert "powered on" in await anext(chunks)
            with path.open("ab") as guest:
                guest.write(b"\x1b[1mlogin:\x07 \t\xe2\x9c\x93\r\n")
            assert await anext(chunks) == "[1mlogin: \t\u2713\n"
            deleted = asyncio.create_task(server.client.delete(f"/vms/{vm['id']}"))
            rest = [chunk async for chunk in chunks]  # the stream ends with the VM
            assert (await deleted).status_code == 204
        assert "".join(rest) == ""
    finally:
        await server.stop()


async def test_bad_ready_when_is_refused(service: Service, request_body: dict[str, Any]) -> None:
    for ready_when, message in (
        ({}, "give exactly one of"),
        ({"tcp": 22, "http": {"port": 80}}, "give exactly one of"),
        ({"tcp": 0}, "ready_when.tcp: Input should be greater than or equal to 1"),
        ({"http": {"port": 80, "path": "health"}}, "ready_when.http.path"),
        ({"guest_agent": False}, "ready_when.guest_agent"),
        ({"tcp": 22, "timeout": 0}, "ready_when.timeout"),
        ({"udp": 53}, "ready_when.udp: unknown field"),
    ):
        response = await service.client.post(
            "/vms", json={**request_body, "ready_when": ready_when}
        )
        assert response.status_code == 400, (ready_when, response.text)
        assert message in response.json()["message"], (ready_when, response.json())


async def test_a_vm_is_running_once_it_is_ready(
    service: Service, request_body: dict[str, Any]
) -> None:
    vm = await service.boot({**request_body, "ready_when": {"guest_agent": True}})
    assert vm["status"] == "running", vm
    assert phases(vm) == ["accepted", "downloading", "cloning", "booting", "ready", "running"]
    assert vm["ready_when"] == {"tcp": None, "http": None, "guest_agent": True, "timeout": None}


async def test_a_guest_that_never_gets_ready_ends_in_not_ready(
    fast_settings: Settings, request_body: dict[str, Any]
) -> None:
    host = SyntheticHost(has_agent=False)
    async with serving(Service(fast_settings, host)) as service:
        body = {**request_body, "ready_when": {"guest_agent": True, "timeout": 1}}
        vm = await service.boot(body)
        assert vm["error"]["code"] == "not-ready", vm
        assert "the guest agent of the guest at 198.18" in vm["error"]["message"]
        assert "within 1 s" in vm["error"]["message"]
        assert service.leftovers(vm["id"]) == []


async def test_network_group_and_egress_are_kept_and_checked(
    service: Service, request_body: dict[str, Any]
) -> None:
    vm = await service.boot({**request_body, "network_group": "ci-7.build_2",
                             "egress": ["203.0.113.0/24:443", "198.51.100.7"]})  # fmt: skip
    assert (vm["network_group"], vm["egress"]) == (
        "ci-7.build_2", ["203.0.113.0/24:443", "198.51.100.7/32"])  # fmt: skip
    assert vm["dropped_packets"] == {}  # what its rules dropped (the synthetic host: nothing)
    closed = await service.boot({**request_body, "egress": "none", "network_type": "hostonly"})
    assert closed["egress"] == "none" and closed["network_group"] is None

    refusals = {
        "egress: 10.0.0.0/8:5432 reaches 10.0.0.0/8, which this host does not allow":
            {"egress": ["10.0.0.0/8:5432"]},
        "egress: 0.0.0.0/0 reaches 0.0.0.0/8": {"egress": ["0.0.0.0/0"]},
        "egress: must be an IPv4 address or network": {"egress": ["2001:db8::/32"]},
        "egress: only nat reaches beyond the host":
            {"egress": ["203.0.113.0/24"], "network_type": "hostonly"},
        "network_group and egress need a network goldclone owns":
            {"network_group": "g", "network_type": "bridged"},
        "network_group": {"network_group": "-starts-with-a-dash"},
        "egress": {"egress": []},
    }  # fmt: skip
    for expected, change in refusals.items():
        response = await service.client.post("/vms", json={**request_body, **change})
        assert response.status_code == 400, (change, response.text)
        assert response.json()["code"] == "invalid-request"
        assert expected in response.json()["message"], (expected, response.json())
    assert len((await service.client.get("/vms")).json()["vms"]) == 2


async def test_a_stopping_service_says_what_keeps_running_and_how_to_remove_it(
    fast_settings: Settings, request_body: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="goldclone.service.vms")
    host = SyntheticHost()  # outlives the service, as a hypervisor does
    async with serving(Service(fast_settings, host)) as service:
        for _ in range(2):
            assert (await service.boot(request_body))["status"] == "running"
        await service.put_pool("warm", {**request_body, "size": 1})
        await service.wait_pool("warm", 1)
    [said] = [r.getMessage() for r in caplog.records if "keep running" in r.getMessage()]
    assert said.startswith("2 VM(s) and 1 warm pool or template machine(s) of this host keep")
    assert "goldclone delete ID" in said and "DELETE /pools/NAME" in said
    caplog.clear()
    async with serving(Service(fast_settings, host)) as service:  # adopted, and removed
        for vm in (await service.client.get("/vms")).json()["vms"]:
            await service.delete(vm["id"])
        assert (await service.client.delete("/pools/warm")).status_code == 204
    assert [r for r in caplog.records if "keep running" in r.getMessage()] == []


async def test_a_vm_that_asks_for_it_is_deleted_when_its_guest_powers_off_not_when_it_crashes(
    service: Service, request_body: dict[str, Any], callbacks: CallbackReceiver
) -> None:
    body = {**request_body, "callback_url": callbacks.url, "on_poweroff": "delete"}
    crashed, done = await service.boot(body), await service.boot(body)
    assert (
        done["on_poweroff"] == "delete"
        and (await service.boot(request_body))["on_poweroff"] == "stop"
    )  # the default
    service.host.crash(crashed["id"])
    assert (await service.client.get(f"/vms/{crashed['id']}")).json()["status"] == "stopped"
    service.host.power_off(done["id"])  # as `poweroff`, a CI job's last step
    async with asyncio.timeout(10):  # noticed by the service itself: nobody reads the VM
        while done["id"] in service.host.machines:
            await asyncio.sleep(service.poll)
        while (await service.client.get(f"/vms/{done['id']}")).status_code != 404:
            await asyncio.sleep(service.poll)  # its machine is gone; its record goes next
    assert service.leftovers(done["id"]) == []
    told = [b for b in await asyncio.to_thread(callbacks.wait_for, 3, 5) if b["id"] == done["id"]]
    assert told[-1]["status"] == "deleting", told
    assert phases(told[-1])[-3:] == ["running", "stopped", "deleting"]
    # the crashed one's check came first, and left it stopped, for whoever looks into it
    assert (await service.client.get(f"/vms/{crashed['id']}")).json()["status"] == "stopped"
