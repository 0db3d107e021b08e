"""What one guest may take of its host, with real QEMU guests: each QEMU in cgroups of its own
under a parent that weighs less than the service, a busy guest that cannot starve its
neighbour, and a QEMU killed at its memory limit, which its VM then reports. Measured by the
cgroups' own accounting, not by timing the guests."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from goldclone.drivers.qemu.bounds import PIDS
from goldclone.host.cgroups import PARENT_SHARES
from goldclone.host.commands import run
from goldclone.polling import until
from goldclone.settings import Settings
from tests.harness import Goldclone, goldclone_server

pytestmark = pytest.mark.root

MB = 1024 * 1024
BUSY = "#!/bin/sh\n" + "while :; do :; done &\n" * 2
"""Two shell loops that never end: two busy vCPUs, or one busy vCPU shared by two loops."""
FILL_ON_KNOCK = """#!/bin/sh
(nc -l -p 81 </dev/null >/dev/null; dd if=/dev/zero of=/fill bs=1M count=160) >/dev/null 2>&1 &
"""
"""Once the host connects to port 81, the guest writes 160 MB into its RAM disk: QEMU then
holds that much more of the guest's RAM."""


@pytest.fixture
async def served(settings: Settings) -> AsyncIterator[Goldclone]:
    async with goldclone_server(settings) as goldclone:
        yield goldclone


async def test_each_qemu_runs_in_groups_of_its_own_that_go_with_it(
    settings: Settings, demo_body: dict[str, Any]
) -> None:
    async with goldclone_server(settings) as goldclone:
        vm = await goldclone.boot({**demo_body, "cpus": 2})
        assert vm["status"] == "running", vm
        cgroups = goldclone.cgroups()
        [pid] = (cgroups.groups(vm["id"])["cpu"] / "cgroup.procs").read_text().split()
        assert Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"qemu-system")
        cpu, memory = cgroups.groups(vm["id"])["cpu"], cgroups.groups(vm["id"])["memory"]
        assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "200000"  # 2 CPUs a period
        assert (cpu / "cpu.shares").read_text().strip() == "1024"  # as any other VM
        assert (cpu.parent / "cpu.shares").read_text().strip() == str(PARENT_SHARES)
        limit = 256 + settings.qemu_memory_overhead + settings.qemu_tcg_cache
        assert int((memory / "memory.limit_in_bytes").read_text()) == limit * MB
        assert (cgroups.groups(vm["id"])["pids"] / "pids.max").read_text().strip() == str(PIDS)
        assert f"tb-size={settings.qemu_tcg_cache}" in Path(f"/proc/{pid}/cmdline").read_text()

        await goldclone.delete(vm["id"])
        assert not any(group.exists() for group in cgroups.groups(vm["id"]).values())
    assert not any(parent.exists() for parent in cgroups.parents.values())


async def test_a_guest_busy_on_two_cpus_leaves_its_neighbour_its_core(
    served: Goldclone, demo_body: dict[str, Any]
) -> None:
    hog, neighbour = await asyncio.gather(
        served.boot({**demo_body, "cpus": 2, "user_data": BUSY}),
        served.boot({**demo_body, "user_data": BUSY}),
    )
    assert hog["status"] == neighbour["status"] == "running", (hog, neighbour)
    cgroups = served.cgroups()

    def used() -> tuple[float, float, float]:
        hog_s, neighbour_s = (cgroups.cpu_seconds(vm["id"]) for vm in (hog, neighbour))
        assert hog_s is not None and neighbour_s is not None
        return time.monotonic(), hog_s, neighbour_s

    start = await asyncio.to_thread(used)
    await asyncio.sleep(10)  # the window the accounting is read over
    end = await asyncio.to_thread(used)
    seconds = end[0] - start[0]
    hog_cores, neighbour_cores = ((end[i] - start[i]) / seconds for i in (1, 2))
    # Three busy vCPU threads: without a group each, the neighbour's one would get a third of
    # what the two machines get; with one, as much as the hog's two. As a share, whatever else
    # the host runs (another worker of the suite) takes of the cores.
    share = neighbour_cores / (hog_cores + neighbour_cores)
    assert share >= 0.42, (hog_cores, neighbour_cores)
    assert hog_cores <= 2.0 + 0.05, hog_cores


async def test_a_qemu_over_its_memory_limit_is_killed_and_its_vm_says_why(
    served: Goldclone, demo_body: dict[str, Any]
) -> None:
    vm = await served.boot({**demo_body, "user_data": FILL_ON_KNOCK})
    neighbour = await served.boot(demo_body)
    assert vm["status"] == neighbour["status"] == "running", (vm, neighbour)
    memory = served.cgroups().groups(vm["id"])["memory"]
    # a deliberately small limit: what it holds now, and 32 MB
    used = int((memory / "memory.usage_in_bytes").read_text())
    (memory / "memory.limit_in_bytes").write_text(str(used + 32 * MB))

    knock = await asyncio.to_thread(socket.create_connection, (vm["ip_address"], 81), 10)
    knock.close()

    async def stopped() -> dict[str, Any] | None:
        found: dict[str, Any] = (await served.client.get(f"/vms/{vm['id']}")).json()
        return found if found["status"] != "running" else None

    ended = await until(stopped, interval=0.5, timeout=120)
    assert ended["status"] == "stopped", ended
    assert "killed its QEMU at the memory limit" in ended["status_reason"], ended
    again = (await served.client.get(f"/vms/{neighbour['id']}")).json()
    assert again["status"] == "running" and again["status_reason"] is None, again


FLOOD = """#!/bin/sh
(while ! ip -4 addr show dev eth0 | grep -q inet; do sleep 0.1; done
 i=0; while :; do i=$((i + 1)); echo "flood line $i xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"; done
) > /dev/ttyS0 2>&1 &
"""


async def test_a_guest_flooding_its_console_keeps_it_to_its_bound(
    settings: Settings, demo_body: dict[str, Any]
) -> None:
    bounded = dataclasses.replace(settings, console_max=1)  # MB
    async with goldclone_server(bounded) as goldclone:
        flood, quiet = await asyncio.gather(
            goldclone.boot({**demo_body, "user_data": FLOOD}), goldclone.boot(demo_body)
        )
        assert flood["status"] == quiet["status"] == "running", (flood, quiet)
        console = goldclone.data_dir / "vms" / flood["id"] / "console.log"

        def written() -> int:  # the number of the newest line in the file
            tail = console.read_bytes()[-4096:].decode(errors="replace")
            numbers = [int(n) for n in re.findall(r"flood line (\d+) ", tail)]
            return max(numbers, default=0)

        # the guest has written well over the bound (each line is about 60 bytes)
        await until(lambda: written() > 3 * (1 << 20) // 64, interval=0.5, timeout=300)
        size = console.stat().st_size
        assert size <= 4 << 20, size  # the bound, and what a second of flood can add
        text = (await goldclone.client.get(f"/vms/{flood['id']}/console")).text
        assert "flood line 1 " not in text and "goldclone-guest: seed on" not in text
        page = await fetch_page(quiet["ip_address"])
        assert quiet["mac_address"] in page


async def fetch_page(ip: str) -> str:
    async with httpx.AsyncClient(timeout=10) as client:
        return (await client.get(f"http://{ip}/")).text


FILL_DISK_ON_KNOCK = """#!/bin/sh
(nc -l -p 81 </dev/null >/dev/null
 dd if=/dev/zero of=/dev/vda bs=1M count=48 conv=fsync && echo filled > /www/filled.txt
) >/dev/null 2>&1 &
"""
"""Once the host connects to port 81, the guest writes 48 MB to its disk (its boot files,
which it no longer needs)."""


async def test_a_full_host_disk_pauses_the_writing_guest_and_it_goes_on_once_there_is_room(
    settings: Settings, demo_body: dict[str, Any], workdir: Path
) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="full", dir=workdir))
    await run("mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(data_dir), timeout=10)
    try:
        small = dataclasses.replace(
            settings, data_dir=data_dir, reserve_mb=4,
            database_url=f"sqlite+aiosqlite:///{workdir / (data_dir.name + '.db')}",
        )  # fmt: skip
        async with goldclone_server(small) as goldclone:
            writer = await goldclone.boot({**demo_body, "user_data": FILL_DISK_ON_KNOCK})
            neighbour = await goldclone.boot(demo_body)
            assert writer["status"] == neighbour["status"] == "running", (writer, neighbour)
            filler = data_dir / "filler"  # leaves 16 MB: less than the guest writes
            await asyncio.to_thread(_fill, filler, shutil.disk_usage(data_dir).free - (16 << 20))
            knock = await asyncio.to_thread(socket.create_connection,
                                            (writer["ip_address"], 81), 10)  # fmt: skip
            knock.close()

            async def paused() -> dict[str, Any] | None:
                vm: dict[str, Any] = (await goldclone.client.get(f"/vms/{writer['id']}")).json()
                return vm if vm["status_reason"] else None

            vm = await until(paused, interval=0.5, timeout=120)
            assert vm["status"] == "running" and "host's disk is full" in vm["status_reason"]
            other = (await goldclone.client.get(f"/vms/{neighbour['id']}")).json()
            assert other["status"] == "running" and other["status_reason"] is None, other
            assert neighbour["mac_address"] in await fetch_page(neighbour["ip_address"])

            filler.unlink()  # room again: the writer goes on and finishes

            async def went_on() -> dict[str, Any] | None:
                vm: dict[str, Any] = (await goldclone.client.get(f"/vms/{writer['id']}")).json()
                return vm if vm["status_reason"] is None else None

            await until(went_on, interval=0.5, timeout=120)
            async with httpx.AsyncClient(timeout=10) as client:
                url = f"http://{writer['ip_address']}/filled.txt"
                done = await until(lambda: _ok(client, url), interval=0.5, timeout=120)
            assert done == "filled\n"
            overlay = data_dir / "vms" / neighbour["id"] / "disk.qcow2"
            code, out, err = await run("qemu-img", "check", "-U", str(overlay), timeout=30,
                                       check=False)  # fmt: skip
            assert code == 0, out + err
    finally:
        await run("umount", str(data_dir), timeout=10)
        data_dir.rmdir()


def _fill(path: Path, size: int) -> None:
    with path.open("wb") as f:
        for _ in range(size >> 20):
            f.write(bytes(1 << 20))


async def _ok(client: httpx.AsyncClient, url: str) -> str | None:
    response = await client.get(url)
    return response.text if response.status_code == 200 else None


WRITE_ON_KNOCK = """#!/bin/sh
(nc -l -p 81 </dev/null >/dev/null; dd if=/dev/zero of=/dev/vda bs=64k count=640 conv=fsync
) >/dev/null 2>&1 &
"""
"""Once the host connects to port 81, the guest writes 40 MB to its disk as fast as it can."""
DISK_MBPS = 2


async def test_a_guest_writing_its_disk_as_fast_as_it_can_is_held_to_the_operators_rate(
    settings: Settings, demo_body: dict[str, Any]
) -> None:
    """Measured by the kernel's accounting of what the QEMU process writes (``wchar``), over
    seconds in which the guest writes without pause: about the rate, never well above it
    (unthrottled, this guest wrote four times as fast here)."""
    limited = dataclasses.replace(settings, qemu_disk_mbps=DISK_MBPS)
    async with goldclone_server(limited) as goldclone:
        vm = await goldclone.boot({**demo_body, "user_data": WRITE_ON_KNOCK})
        assert vm["status"] == "running", vm
        [pid] = (goldclone.cgroups().groups(vm["id"])["cpu"] / "cgroup.procs").read_text().split()
        assert "throttling.bps-total=" in Path(f"/proc/{pid}/cmdline").read_text()
        before = _written(pid)
        knock = await asyncio.to_thread(socket.create_connection, (vm["ip_address"], 81), 10)
        knock.close()
        await until(lambda: _written(pid) > before + MB, interval=0.1, timeout=60)
        start, started = _written(pid), time.monotonic()
        await asyncio.sleep(4)  # the window measured: the write goes on throughout it
        rate = (_written(pid) - start) / (time.monotonic() - started) / MB
        assert DISK_MBPS * 0.5 < rate < DISK_MBPS * 1.3, rate


def _written(pid: str) -> int:
    """The bytes that process ``pid`` has passed to write calls so far."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        name, value = line.split(":")
        if name == "wchar":
            return int(value)
    raise AssertionError(f"no wchar in /proc/{pid}/io")
