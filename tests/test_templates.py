"""Memory templates in the QEMU driver, on the real demo guest: a booted guest saved with its
RAM in a file, and machines restored from it, each its own machine."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from goldclone.drivers.base import MachineSpec, TemplateFiles
from goldclone.drivers.qemu import QemuDriver
from goldclone.drivers.qemu.command import GUEST_NICE
from goldclone.drivers.qemu.network import Attachment, Networks
from goldclone.guest.config import GuestConfig
from goldclone.image_spec import ImageSpec
from goldclone.images.cache import ImageCache
from goldclone.images.gold import GoldImage
from goldclone.settings import Settings
from tests.conftest import checksum
from tests.harness import Goldclone, disk_info, leftovers, links, processes_mentioning
from tests.servers import FileServer

pytestmark = pytest.mark.root

USER_DATA = "#!/bin/sh\necho restored-{name} > /www/hello.txt\n"


class Host:
    def __init__(self, driver: QemuDriver, gold: GoldImage, folder: Path) -> None:
        self.driver, self.gold, self.folder = driver, gold, folder
        self.machines: dict[str, Attachment] = {}

    async def boot(self, spec: MachineSpec, template: TemplateFiles | None = None) -> str:
        await self.driver.clone(spec.machine, self.gold, template if spec.restore else None)
        runtime = await self.driver.attach(spec.machine, "nat")
        self.machines[spec.machine] = runtime
        await self.driver.start(spec, runtime)
        if spec.restore:
            await self.driver.personalize(runtime, spec.guest, timeout=60)
        return await self.driver.wait_for_ip(runtime, 90)

    async def agent(
        self, machine: str, command: str, arguments: dict[str, Any] | None = None
    ) -> Any:
        return await self.driver.agent_link(machine).execute(command, arguments)

    async def destroy(self, machine: str) -> None:
        await self.driver.destroy(machine, self.machines.pop(machine))


@pytest.fixture
async def host(
    settings: Settings, file_server: FileServer, demo_package: Path
) -> AsyncIterator[Host]:
    data_dir = settings.data_dir.absolute()
    networks = Networks(settings.network, data_dir / "networks")
    driver = QemuDriver(data_dir, networks, accel="auto")
    await driver.prepare()
    spec = ImageSpec(url=file_server.url(demo_package.name), checksum=checksum(demo_package))
    async with httpx.AsyncClient() as http:
        images = ImageCache(data_dir, http)
        await images.open()

        async def nothing() -> None:
            pass

        gold = await images.ensure(spec, nothing)
        folder = data_dir / "templates" / "t1"
        folder.mkdir(parents=True, mode=0o700)
        host = Host(driver, gold, folder)
        try:
            yield host
        finally:
            for machine in list(host.machines):
                await host.destroy(machine)
            await images.close()
            await driver.close(vms_running=False)


def shape(guest: GuestConfig, template: TemplateFiles, restore: bool) -> MachineSpec:
    return MachineSpec(guest.instance_id, 1, 256, True, guest, template, restore)


async def test_restored_machines_are_each_their_own(host: Host, tmp_path: Path) -> None:
    files = TemplateFiles(host.folder)
    maker = str(uuid.uuid4())
    await host.boot(shape(GuestConfig(maker, "template"), files, restore=False))
    await asyncio.wait_for(_agent_up(host, maker), 60)
    assert _scheduling(_qemu_pid(host, maker)) == {(os.SCHED_OTHER, GUEST_NICE)}  # cold
    runtime = host.machines[maker]
    await host.driver.save_template(maker, runtime, files)
    await host.destroy(maker)
    assert {p.name: p.stat().st_mode & 0o777 for p in files.folder.iterdir()} == {
        "disk.qcow2": 0o400, "ram": 0o400, "state": 0o400, "overlay.qcow2": 0o400,
        "hardware.json": 0o400,
    }  # fmt: skip
    ram_digest = hashlib.sha256(files.ram.read_bytes()).hexdigest()

    clones = {}
    for name in ("clone-a", "clone-b"):
        guest = GuestConfig(str(uuid.uuid4()), name, (f"ssh-ed25519 AAAAkey {name}",),
                            USER_DATA.format(name=name), {"job": f"job-of-{name}"})  # fmt: skip
        started = time.monotonic()
        ip = await host.boot(shape(guest, files, restore=True), files)
        clones[name] = (guest, ip, time.monotonic() - started)
    [(a, ip_a, _), (b, ip_b, _)] = clones.values()
    # its own MAC, IP, tap and disk overlay
    nic_a, nic_b = host.machines[a.instance_id], host.machines[b.instance_id]
    assert len({nic_a.mac, nic_b.mac}) == 2 and len({nic_a.tap, nic_b.tap}) == 2
    assert ip_a != ip_b
    for guest in (a, b):  # a copy of the template's empty overlay, on the template's disk
        disk = host.driver.vm_dir(guest.instance_id) / "disk.qcow2"
        assert (await disk_info(disk))["backing-filename"] == str(files.disk)
        assert disk.stat().st_mode & 0o777 == 0o600
    for guest, ip, _ in clones.values():
        async with httpx.AsyncClient(timeout=10) as client:
            page = (await client.get(f"http://{ip}/")).text.splitlines()
            hello = (await client.get(f"http://{ip}/hello.txt")).text
        mac = host.machines[guest.instance_id].mac
        assert any(line.startswith("eth") and mac in line and ip in line for line in page), page
        assert f"hostname {guest.hostname}" in page
        assert f"ssh-key {guest.ssh_authorized_keys[0]}" in page
        assert f'metadata {{"job": "job-of-{guest.hostname}"}}' in page
        assert hello == f"restored-{guest.hostname}\n"
        # the clock is the host's, not the template's
        guest_ns = await host.agent(guest.instance_id, "guest-get-time")
        assert abs(guest_ns - time.time_ns()) < 1_000_000_000
        pid = _qemu_pid(host, guest.instance_id)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert any(f"mem-path={files.ram},share=off".encode() in arg for arg in cmdline)
        assert _scheduling(pid) == {(os.SCHED_BATCH, GUEST_NICE)}
    # a fresh VM generation ID: the two kernels reseeded apart
    reads = [await _urandom(host, g.instance_id) for g, _, _ in clones.values()]
    assert reads[0] != reads[1]
    # the template is untouched by its clones
    assert hashlib.sha256(files.ram.read_bytes()).hexdigest() == ram_digest
    for guest, ip, _ in clones.values():
        await host.destroy(guest.instance_id)
        vm = {"id": guest.instance_id, "ip_address": ip, "mac_address": ""}
        assert leftovers(host.driver.vm_dir(guest.instance_id).parent.parent, vm) == []
    assert processes_mentioning(str(files.ram)) == []


def _qemu_pid(host: Host, machine: str) -> int:
    return int((host.driver.vm_dir(machine) / "qemu.pid").read_text())


def _scheduling(pid: int) -> set[tuple[int, int]]:
    """The scheduling policies and nice values of the threads of process ``pid``."""
    threads = [int(task.name) for task in Path(f"/proc/{pid}/task").iterdir()]
    return {(os.sched_getscheduler(t), os.getpriority(os.PRIO_PROCESS, t)) for t in threads}


async def _agent_up(host: Host, machine: str) -> None:
    while not await host.driver.agent_ping(host.machines[machine]):
        await asyncio.sleep(0.1)


async def _urandom(host: Host, machine: str) -> bytes:
    reply = await host.agent(machine, "guest-exec", {
        "path": "/bin/sh", "arg": ["-c", "head -c 16 /dev/urandom | od -An -tx1"],
        "capture-output": True,
    })  # fmt: skip
    while not (status := await host.agent(machine, "guest-exec-status", reply)).get("exited"):
        await asyncio.sleep(0.05)
    return base64.b64decode(status["out-data"])


async def test_the_api_restores_vms_of_a_templates_shape(
    goldclone: Goldclone, file_server: FileServer, demo_package: Path
) -> None:
    image = {"url": file_server.url(demo_package.name), "checksum": checksum(demo_package)}
    shape = {"cpus": 1, "memory": 256, "disk_size": 1}
    cold = await goldclone.boot({"image": image, "cpus": 1, "memory": 256})  # fetches the image
    async with httpx.AsyncClient(timeout=10) as client:
        page = (await client.get(f"http://{cold['ip_address']}/")).text.splitlines()
    [image_disk] = [line for line in page if line.startswith("disk ")]
    await goldclone.delete(cold["id"])
    image_id = f"sha256-{image['checksum']}"
    body = {"image": image, **shape}
    response = await goldclone.client.post(f"/images/{image_id}/templates", json=shape)
    assert response.status_code == 202, response.text
    template_id = response.json()["id"]
    async with asyncio.timeout(120):
        while True:
            [found] = (await goldclone.client.get("/images")).json()["images"]
            [template] = found["templates"]
            if template["status"] != "creating":
                break
            await asyncio.sleep(0.2)
    assert template["status"] == "ready", template
    assert processes_mentioning(template_id) == []  # the machine that made it is gone

    vms = [await goldclone.boot({**body, "name": f"warm-{n}"}) for n in range(2)]
    for vm in vms:
        assert vm["status"] == "running" and vm["started_from"] == "template", vm
        assert [e["phase"] for e in vm["timeline"]] == [
            "accepted",
            "cloning",
            "restoring",
            "running",
        ]
        async with httpx.AsyncClient(timeout=10) as client:
            page = (await client.get(f"http://{vm['ip_address']}/")).text.splitlines()
        assert f"hostname {vm['name']}" in page and any(vm["mac_address"] in line for line in page)
        assert f"disk {1 << 30}" in page and image_disk not in page  # the template's size
    assert len({vm["ip_address"] for vm in vms}) == 2
    for vm in vms:
        await goldclone.delete(vm["id"])
        assert leftovers(goldclone.data_dir, vm) == []
    assert (await goldclone.client.delete(f"/images/{image_id}")).status_code == 204
    assert not any((goldclone.data_dir / "templates").rglob("*"))


async def test_the_api_claims_vms_from_a_warm_pool_and_refills_it(
    goldclone: Goldclone, file_server: FileServer, demo_package: Path
) -> None:
    image = {"url": file_server.url(demo_package.name), "checksum": checksum(demo_package)}
    shape = {"cpus": 1, "memory": 256, "disk_size": 1}
    made = await goldclone.put_pool("ci", {"image": image, **shape, "size": 2})
    assert made["status"] == "filling"  # it fetches the image and makes the template itself
    await goldclone.wait_pool("ci", 2, timeout=240)
    vms = [await goldclone.boot({"image": image, **shape, "name": f"job-{n}"}) for n in range(2)]
    for vm in vms:
        assert (vm["status"], vm["started_from"], vm["pool"]) == ("running", "pool", "ci"), vm
        assert [e["phase"] for e in vm["timeline"]] == ["accepted", "claimed", "running"]
        async with httpx.AsyncClient(timeout=10) as client:
            page = (await client.get(f"http://{vm['ip_address']}/")).text.splitlines()
        assert f"hostname {vm['name']}" in page and any(vm["mac_address"] in line for line in page)
        assert f"disk {1 << 30}" in page
    assert len({vm["ip_address"] for vm in vms}) == 2
    refilled = await goldclone.wait_pool("ci", 2, timeout=120)
    assert refilled["claimed"] == 2
    for vm in vms:
        await goldclone.delete(vm["id"])
        assert leftovers(goldclone.data_dir, vm) == []
    assert (await goldclone.client.delete("/pools/ci")).status_code == 204
    assert list((goldclone.data_dir / "vms").iterdir()) == []  # the pooled machines' too
    assert processes_mentioning(str(goldclone.data_dir.absolute() / "vms")) == []  # no QEMU
    assert [link for link in links() if re.fullmatch("gc[0-9a-f]{12}", link)] == []  # taps
