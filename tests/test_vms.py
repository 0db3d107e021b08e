"""The whole VM lifecycle through the real HTTP API: real QEMU guests, DHCP and downloads."""

from __future__ import annotations

import asyncio
import dataclasses
import pwd
import socket
import stat
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from goldclone.drivers.qemu.qmp import qmp_execute
from goldclone.fields import MIN_MEMORY_MB
from goldclone.settings import Settings
from tests.conftest import checksum
from tests.harness import (
    Goldclone,
    goldclone_server,
    leftovers,
    links,
    processes_mentioning,
    settled,
)
from tests.packages import extract_disk, make_package
from tests.servers import CallbackReceiver, FileServer

pytestmark = pytest.mark.root


def original_example(url: str, digest: str, callback_url: str) -> dict[str, Any]:
    """The OS X Builder README's request, with only the image and callback addresses changed."""
    return {
        "cpus": 2,
        "memory": 1024,
        "network_type": "nat",
        "image": {"url": url, "checksum": digest, "checksum_type": "sha1"},
        "headless": True,
        "callback_url": callback_url,
    }


def small(url: str, digest: str, kind: str = "sha256", **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "cpus": 1,
        "memory": 256,
        "image": {"url": url, "checksum": digest, "checksum_type": kind},
    }
    return body | changes


async def guest_page(ip: str) -> str:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"http://{ip}/")
    assert response.status_code == 200
    return response.text


async def assert_serves(vm: dict[str, Any]) -> None:
    """The reported IP is real: the guest at it answers, and it is the VM with that MAC."""
    assert vm["status"] == "running", vm
    page = await guest_page(vm["ip_address"])
    assert "goldclone demo guest" in page
    assert vm["mac_address"] and vm["mac_address"] in page


def assert_confined(goldclone: Goldclone, vm: dict[str, Any]) -> None:
    """QEMU runs unprivileged under seccomp, and its folder and monitor are the owner's only."""
    vm_dir = goldclone.data_dir.absolute() / "vms" / vm["id"]
    pid = int((vm_dir / "qemu.pid").read_text())
    status = dict(
        line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if ":\t" in line
    )  # fmt: skip
    assert status["Uid"].split()[0] == str(pwd.getpwnam("nobody").pw_uid)
    assert status["Seccomp"].strip() == "2"
    assert stat.S_IMODE(vm_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((vm_dir / "qmp.sock").stat().st_mode) == 0o600


async def destroy_and_check(goldclone: Goldclone, vm: dict[str, Any]) -> None:
    await goldclone.delete(vm["id"])
    assert (await goldclone.client.get(f"/vms/{vm['id']}")).status_code == 404
    assert leftovers(goldclone.data_dir, vm) == []


@pytest.fixture(scope="module")
def packages(workdir: Path, demo_package: Path, file_server: FileServer) -> dict[str, Path]:
    """The demo disk in every package format, served by the file server."""
    disk = extract_disk(demo_package, workdir / "disk.qcow2")
    made = {}
    for kind in ("tar.gz", "tar.bz2", "tar", "zip", "qcow2", "vmware"):
        made[kind] = make_package(disk, kind, file_server.root / f"demo-{kind}.pkg")
    return made


DemoRequest = Callable[..., dict[str, Any]]


@pytest.fixture
def demo_request(file_server: FileServer, packages: dict[str, Path]) -> DemoRequest:
    """A small create request for the demo tar.gz, with ``changes`` applied."""
    package = packages["tar.gz"]
    return lambda **changes: small(file_server.url(package.name), checksum(package), **changes)


def copy_as(file_server: FileServer, package: Path) -> str:
    """A fresh name for the same package, so its GETs can be counted on their own."""
    name = f"{uuid.uuid4().hex}.pkg"
    (file_server.root / name).write_bytes(package.read_bytes())
    return name


@pytest.mark.parametrize("network_type", ["nat", "hostonly"])
async def test_original_example_end_to_end(
    goldclone: Goldclone,
    file_server: FileServer,
    demo_package: Path,
    callbacks: CallbackReceiver,
    network_type: str,
) -> None:
    body = original_example(
        file_server.url("demo.tar.gz"), checksum(demo_package, "sha1"), callbacks.url
    )
    body["network_type"] = network_type
    accepted = await goldclone.post_vm(body)
    assert accepted["status"] == "creating"
    uuid.UUID(accepted["id"])

    vm = await goldclone.wait_for(accepted["id"], "running", "error")
    await assert_serves(vm)
    host = goldclone.settings.network.subnet(network_type).network_address + 1
    assert f"dns {host}" in await guest_page(vm["ip_address"])  # DHCP named our DNS server
    assert vm["cpus"] == 2 and vm["memory"] == 1024 and vm["network_type"] == network_type
    phases = [entry["phase"] for entry in vm["timeline"]]
    assert phases == ["accepted", "downloading", "cloning", "booting", "running"]

    assert_confined(goldclone, vm)

    [delivered] = await asyncio.to_thread(callbacks.wait_for, 1, 30)
    assert delivered == settled(vm) | {"dropped_packets": None}  # only GET has it
    listed = (await goldclone.client.get("/vms")).json()["vms"]
    assert [v["id"] for v in listed] == [vm["id"]]

    await destroy_and_check(goldclone, vm)

    # with no VM left, a stopped service leaves no network behind either
    await goldclone.stop()
    assert goldclone.settings.network.bridge(network_type) not in links()
    assert processes_mentioning(str(goldclone.data_dir)) == []


@pytest.mark.parametrize(
    ("kind", "checksum_type"),
    [
        ("tar.bz2", "md5"),
        ("tar", "sha1"),
        ("zip", "sha512"),
        ("qcow2", "sha256"),
        ("vmware", "sha1"),
    ],
)
async def test_every_package_format_boots(
    goldclone: Goldclone,
    file_server: FileServer,
    packages: dict[str, Path],
    kind: str,
    checksum_type: str,
) -> None:
    package = packages[kind]
    body = small(file_server.url(package.name), checksum(package, checksum_type), checksum_type)
    vm = await goldclone.boot(body)
    await assert_serves(vm)
    gold = goldclone.data_dir / "images" / f"{checksum_type}-{checksum(package, checksum_type)}"
    assert gold.is_dir()
    await destroy_and_check(goldclone, vm)
    assert gold.is_dir(), "the gold image stays for the next VM"


async def test_concurrent_creates_share_one_download(
    goldclone: Goldclone, file_server: FileServer, packages: dict[str, Path]
) -> None:
    name = copy_as(file_server, packages["tar.gz"])
    url, digest = file_server.url(name), checksum(packages["tar.gz"])
    accepted = await asyncio.gather(*(goldclone.post_vm(small(url, digest)) for _ in range(3)))
    vms = [await goldclone.wait_for(vm["id"], "running", "error") for vm in accepted]
    for vm in vms:
        await assert_serves(vm)
    assert file_server.gets[name] == 1
    assert len({vm["ip_address"] for vm in vms}) == 3
    assert len({vm["mac_address"] for vm in vms}) == 3

    # a cache hit downloads nothing
    again = await goldclone.wait_for(
        (await goldclone.post_vm(small(url, digest)))["id"], "running", "error"
    )
    await assert_serves(again)
    assert file_server.gets[name] == 1
    assert "downloading" not in [entry["phase"] for entry in again["timeline"]]
    for vm in [*vms, again]:
        await destroy_and_check(goldclone, vm)


async def test_running_vms_survive_a_restart(
    goldclone: Goldclone, demo_request: DemoRequest
) -> None:
    vm = await goldclone.boot(demo_request())
    await assert_serves(vm)

    await goldclone.stop()
    await goldclone.start()

    after = (await goldclone.client.get(f"/vms/{vm['id']}")).json()
    assert settled(after) == settled(vm)
    await assert_serves(after)
    await destroy_and_check(goldclone, after)


async def test_the_demo_guest_boots_with_the_least_memory_a_vm_may_have(
    goldclone: Goldclone, demo_request: DemoRequest
) -> None:
    """``MIN_MEMORY_MB`` is one that boots: the demo guest's kernel panics below 80 MB."""
    vm = await goldclone.boot(demo_request(memory=MIN_MEMORY_MB))
    await assert_serves(vm)
    less = await goldclone.client.post("/vms", json=demo_request(memory=MIN_MEMORY_MB - 1))
    assert (less.status_code, less.json()["message"]) == (
        400, f"memory: Input should be greater than or equal to {MIN_MEMORY_MB}"
    )  # fmt: skip
    await destroy_and_check(goldclone, vm)


async def test_a_guest_that_powers_off_is_stopped(
    goldclone: Goldclone, demo_request: DemoRequest
) -> None:
    vm = await goldclone.boot(demo_request())
    await assert_serves(vm)
    qmp = goldclone.data_dir.absolute() / "vms" / vm["id"] / "qmp.sock"
    await qmp_execute(qmp, "system_powerdown")
    stopped = await goldclone.wait_for(vm["id"], "stopped", timeout=60)
    assert stopped["timeline"][-1]["phase"] == "stopped"
    await destroy_and_check(goldclone, stopped)


POWEROFF_ON_KNOCK = """#!/bin/sh
(nc -l -p 81 </dev/null >/dev/null; sync; poweroff -f) >/dev/null 2>&1 &
"""
"""Once the host connects to port 81, the guest powers itself off, as a CI job's last step
(``-f``: the demo guest's init is a script, which a plain ``poweroff`` only signals)."""


async def test_a_vm_of_on_poweroff_delete_is_deleted_when_its_guest_powers_off(
    goldclone: Goldclone, demo_request: DemoRequest, callbacks: CallbackReceiver
) -> None:
    body = demo_request(user_data=POWEROFF_ON_KNOCK, on_poweroff="delete",
                        callback_url=callbacks.url)  # fmt: skip
    vm = await goldclone.boot(body)
    assert vm["status"] == "running", vm
    knock = await asyncio.to_thread(socket.create_connection, (vm["ip_address"], 81), 10)
    knock.close()
    async with asyncio.timeout(60):  # its power-off, then the next look (2 s) and the delete
        while (await goldclone.client.get(f"/vms/{vm['id']}")).status_code != 404:
            await asyncio.sleep(0.2)
    assert leftovers(goldclone.data_dir, vm) == []
    [*_, told] = await asyncio.to_thread(callbacks.wait_for, 2, 30)
    assert told["status"] == "deleting" and told["timeline"][-2]["phase"] == "stopped", told
    assert "exited normally" in told["status_reason"]


async def test_delete_cancels_a_create_in_progress(
    goldclone: Goldclone, demo_request: DemoRequest
) -> None:
    vm = await goldclone.post_vm(demo_request())
    await goldclone.wait_for_phase(vm["id"], "booting")
    await destroy_and_check(goldclone, vm)


async def test_callback_is_retried_and_a_dead_receiver_harms_nothing(
    goldclone: Goldclone, demo_request: DemoRequest
) -> None:
    with CallbackReceiver(fail_first=2).running() as flaky:
        vm = await goldclone.boot(demo_request(callback_url=flaky.url))
        [delivered] = await asyncio.to_thread(flaky.wait_for, 1, 30)
        assert flaky.attempts == 3
        assert delivered["id"] == vm["id"] and delivered["status"] == "running"

    with CallbackReceiver(fail_first=10**6).running() as dead:
        other = await goldclone.boot(demo_request(callback_url=dead.url))
        await assert_serves(other)
    for v in (vm, other):
        await destroy_and_check(goldclone, v)


@pytest.fixture
def host_bridge() -> Iterator[tuple[str, Path]]:
    """An existing host bridge with its own DHCP server, as a LAN would have; not goldclone's."""
    bridge, leases, pidfile = (
        "gcxlan0",
        Path(f"/tmp/{uuid.uuid4().hex}.leases"),
        Path(f"/tmp/{uuid.uuid4().hex}.pid"),
    )
    run = lambda *argv: subprocess.run(argv, check=True)  # noqa: E731
    run("ip", "link", "add", bridge, "type", "bridge", "forward_delay", "0", "stp_state", "0")
    run("ip", "addr", "add", "10.77.0.1/24", "dev", bridge)
    run("ip", "link", "set", bridge, "up")
    run("dnsmasq", "--conf-file=/dev/null", "--port=0", "--bind-interfaces",
        f"--interface={bridge}", "--except-interface=lo", "--dhcp-range=10.77.0.50,10.77.0.99,1h",
        f"--dhcp-leasefile={leases}", "--dhcp-authoritative", "--no-ping",
        f"--pid-file={pidfile}")  # fmt: skip
    try:
        yield bridge, leases
    finally:
        pid = int(pidfile.read_text())
        subprocess.run(["kill", str(pid)], check=False)
        subprocess.run(["ip", "link", "del", bridge], check=False)
        leases.unlink(missing_ok=True)
        pidfile.unlink(missing_ok=True)


async def test_bridged_joins_an_existing_bridge(
    settings: Settings, demo_request: DemoRequest, host_bridge: tuple[str, Path]
) -> None:
    bridge, _ = host_bridge
    network = dataclasses.replace(settings.network, bridged_bridge=bridge)
    bridged = dataclasses.replace(settings, network=network)
    async with goldclone_server(bridged) as goldclone:
        vm = await goldclone.boot(demo_request(network_type="bridged"))
        await assert_serves(vm)
        assert vm["ip_address"].startswith("10.77.0.")
        await destroy_and_check(goldclone, vm)
        assert bridge in links(), "a host bridge is not ours to remove"
