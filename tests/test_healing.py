"""Shared host parts heal themselves, and services never harm each other: real dnsmasq,
bridges and QEMU guests in the test run's private network namespace."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from goldclone.drivers.qemu.network import bridge
from goldclone.host.commands import run
from goldclone.settings import Settings
from tests.harness import Goldclone, goldclone_server, leftovers
from tests.servers import free_port
from tests.serving import GOLDCLONE, serving

pytestmark = pytest.mark.root

NAT_BRIDGE = "gcnat0"


async def answers(ip: str, timeout: float = 15.0) -> float:
    """Seconds until the guest at ``ip`` serves its page (it may be unreachable at first)."""
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=2) as client, asyncio.timeout(timeout):
        while True:
            try:
                if (await client.get(f"http://{ip}/")).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                await asyncio.sleep(0.2)


def dnsmasq_pid(goldclone: Goldclone) -> int:
    return int((goldclone.data_dir.absolute() / "networks" / "nat" / "dnsmasq.pid").read_text())


async def test_a_killed_dnsmasq_is_restarted(
    goldclone: Goldclone, demo_body: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="goldclone")
    running = await goldclone.boot(demo_body)
    assert running["status"] == "running", running
    first_boot = _span(running)
    dead = dnsmasq_pid(goldclone)
    os.kill(dead, signal.SIGKILL)

    new = await goldclone.boot(demo_body)
    assert new["status"] == "running", new
    assert _span(new) < first_boot + 10, (first_boot, _span(new))
    assert dnsmasq_pid(goldclone) != dead
    await answers(running["ip_address"])
    repairs = [r.getMessage() for r in caplog.records if "restarted DHCP" in r.getMessage()]
    assert len(repairs) == 1, repairs
    for vm in (running, new):
        await goldclone.delete(vm["id"])


async def test_a_deleted_bridge_is_made_again_under_running_guests(
    goldclone: Goldclone, demo_body: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="goldclone")
    running = await goldclone.boot(demo_body)
    assert running["status"] == "running", running
    await run("ip", "link", "del", "dev", NAT_BRIDGE)
    deleted = time.monotonic()

    async with asyncio.timeout(15):
        while (found := await bridge.link(NAT_BRIDGE)) is None:
            await asyncio.sleep(0.1)
    assert found.kind == "bridge"
    await answers(running["ip_address"], timeout=15 - (time.monotonic() - deleted))
    ready = (await goldclone.client.get("/readyz")).json()
    assert ready["checks"]["network nat"] == {"ok": True, "reason": None}
    new = await goldclone.boot(demo_body)
    assert new["status"] == "running", new
    repairs = [r.getMessage() for r in caplog.records if "made the bridge again" in r.getMessage()]
    assert len(repairs) == 1 and "put 1 tap(s) back on it" in repairs[0], repairs
    for vm in (running, new):
        await goldclone.delete(vm["id"])
        assert leftovers(goldclone.data_dir, vm) == []


async def test_readyz_says_what_is_broken(settings: Settings, demo_body: dict[str, Any]) -> None:
    network = dataclasses.replace(settings.network, check_interval=3600)
    async with goldclone_server(dataclasses.replace(settings, network=network)) as goldclone:
        vm = await goldclone.boot(demo_body)
        os.kill(dnsmasq_pid(goldclone), signal.SIGKILL)
        async with asyncio.timeout(5):
            while (response := await goldclone.client.get("/readyz")).status_code == 200:
                await asyncio.sleep(0.05)  # until the kernel has reaped the process
        assert response.status_code == 503
        assert response.json()["checks"]["network nat"] == {
            "ok": False,
            "reason": f"no DHCP server serves {NAT_BRIDGE}",
        }
        assert response.json()["checks"]["store"]["ok"] is True
        await goldclone.delete(vm["id"])


def _serve(data_dir: Path, port: int, **env: str) -> subprocess.CompletedProcess[str]:
    """``goldclone serve`` as its own process, with ``env`` added, until it exits (1.5-2 s
    here). Once in CI it had not ended after 60 s, with no trace of why: one that hangs now
    gets SIGABRT, which with ``PYTHONFAULTHANDLER`` writes every thread's stack to its log,
    and the test fails with that whole log."""
    command = [sys.executable, "-m", "goldclone.cli", "serve", "--port", str(port),
               "--data-dir", str(data_dir)]  # fmt: skip
    env = os.environ | env | {"PYTHONFAULTHANDLER": "1"}
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as process:
        try:
            out, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)
            try:
                _, err = process.communicate(timeout=10)
            finally:
                process.kill()
            raise AssertionError(f"goldclone serve did not end within 60 s:\n{err}") from None
        finally:
            process.kill()  # a no-op once it has ended; ends it on Ctrl-C
    return subprocess.CompletedProcess(command, process.returncode, out, err)


async def test_a_second_service_elsewhere_leaves_the_first_alone(
    goldclone: Goldclone, demo_body: dict[str, Any], workdir: Path
) -> None:
    running = await goldclone.boot(demo_body)
    assert running["status"] == "running", running
    other = workdir / "other-dir"
    second = await asyncio.to_thread(_serve, other, free_port())
    assert second.returncode == 1
    assert "Traceback" not in second.stderr
    assert f"the bridge {NAT_BRIDGE} belongs to the goldclone service of the data dir" in (
        second.stderr
    ), second.stderr
    await answers(running["ip_address"])
    assert (await bridge.link(NAT_BRIDGE)) is not None
    new = await goldclone.boot(demo_body)
    assert new["status"] == "running", new
    await answers(new["ip_address"])
    for vm in (running, new):
        await goldclone.delete(vm["id"])


async def test_a_second_service_with_its_own_bridges_works_beside_the_first(
    goldclone: Goldclone, demo_body: dict[str, Any], workdir: Path
) -> None:
    """With bridges and subnets of its own, a second service starts, serves and stops, and
    the first one's guests and networks are as they were."""
    running = await goldclone.boot(demo_body)
    assert running["status"] == "running", running
    own = {
        "GOLDCLONE_NAT_BRIDGE": "gcnat7",
        "GOLDCLONE_NAT_SUBNET": "192.168.77.0/24",
        "GOLDCLONE_HOSTONLY_BRIDGE": "gchost7",
        "GOLDCLONE_HOSTONLY_SUBNET": "10.77.0.0/24",
    }
    port = free_port()
    argv = [*GOLDCLONE, "serve", "--port", str(port), "--data-dir", str(workdir / "beside")]

    def second_service() -> None:
        with serving(argv, own, port):
            assert httpx.get(f"http://127.0.0.1:{port}/vms").json() == {"vms": []}

    await asyncio.to_thread(second_service)
    await answers(running["ip_address"])
    taps = await bridge.ports(NAT_BRIDGE)
    assert len(taps) == 1, taps
    new = await goldclone.boot(demo_body)
    assert new["status"] == "running", new
    for vm in (running, new):
        await goldclone.delete(vm["id"])


async def test_a_second_service_on_the_same_data_dir_refuses(
    goldclone: Goldclone, demo_body: dict[str, Any]
) -> None:
    running = await goldclone.boot(demo_body)
    state = goldclone.data_dir / "state.db"
    before = (state.stat().st_mtime_ns, sorted(p.name for p in goldclone.data_dir.iterdir()))
    second = await asyncio.to_thread(_serve, goldclone.data_dir, free_port())
    assert second.returncode == 1, second
    assert f"in use by another goldclone service (PID {os.getpid()})" in second.stderr
    assert "Traceback" not in second.stderr
    after = (state.stat().st_mtime_ns, sorted(p.name for p in goldclone.data_dir.iterdir()))
    assert after == before
    assert (await goldclone.client.get(f"/vms/{running['id']}")).json()["status"] == "running"
    await answers(running["ip_address"])
    await goldclone.delete(running["id"])


async def test_a_lease_that_cannot_be_released_does_not_fail_the_delete(
    settings: Settings,
    demo_body: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``dhcp_release`` fails (a stand-in that exits 1 comes first on PATH) while a VM is
    deleted: the answer is still 204, and the next reconcile releases the lease."""
    caplog.set_level(logging.INFO, logger="goldclone")
    async with goldclone_server(dataclasses.replace(settings, reconcile_interval=1)) as goldclone:
        vm = await goldclone.boot(demo_body)
        broken = tmp_path / "bin" / "dhcp_release"
        broken.parent.mkdir()
        broken.write_text("#!/bin/sh\necho 'dhcp_release: cannot send' >&2\nexit 1\n")
        broken.chmod(broken.stat().st_mode | stat.S_IXUSR)
        monkeypatch.setenv("PATH", f"{broken.parent}:{os.environ['PATH']}")
        response = await goldclone.client.delete(f"/vms/{vm['id']}")
        assert response.status_code == 204, response.text
        assert (await goldclone.client.get(f"/vms/{vm['id']}")).status_code == 404
        monkeypatch.undo()
        retry = f"VM {vm['id']}: retry 1 of its cleanup removed what was left"
        async with asyncio.timeout(10):
            while not any(retry in r.getMessage() for r in caplog.records):
                await asyncio.sleep(0.1)
        assert leftovers(goldclone.data_dir, vm) == []


def _span(vm: dict[str, Any]) -> float:
    from datetime import datetime

    at = {entry["phase"]: datetime.fromisoformat(entry["at"]) for entry in vm["timeline"]}
    return (at["running"] - at["accepted"]).total_seconds()
