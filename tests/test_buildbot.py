"""A real Buildbot master (from PyPI, goldclone's ``buildbot`` extra) with goldclone's latent
worker, and Debian's ``buildbot-worker`` in the Debian test guest: each build runs in a fresh
VM claimed from a warm pool, the worker started in it through exec and connecting back to the
master through a host port that the walls allow; the VM is gone after a build that passes,
one that fails, and one whose master was killed mid-build and started again."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from goldclone.settings import Settings
from tests.conftest import checksum
from tests.harness import Goldclone, goldclone_server
from tests.servers import FileServer
from tests.serving import free_port

pytestmark = [pytest.mark.root, pytest.mark.timeout(1500)]

HOST, MASTER_PORT = "192.168.123.1", 9989  # the default nat bridge's address; an allowed port
BOOT_TIMEOUT = 900.0
BUILDBOT = [str(Path(sys.executable).with_name("buildbot"))]
MASTER_CFG = """\
from buildbot.plugins import schedulers, steps, util
from goldclone.integrations.buildbot import GoldcloneLatentWorker

c = BuildmasterConfig = {{}}
c["workers"] = [GoldcloneLatentWorker(
    "vm-worker", url={url!r}, pool="debian", master_address="{host}:{port}", ttl=3600,
    missing_timeout=600)]
c["protocols"] = {{"pb": {{"port": "tcp:{port}"}}}}
c["schedulers"] = [schedulers.ForceScheduler(name="force", builderNames=["good", "bad", "slow"])]


def build(*commands):
    factory = util.BuildFactory([steps.ShellCommand(name=f"step-{{n}}", command=command)
                                 for n, command in enumerate(commands, 1)])
    return factory


c["builders"] = [
    util.BuilderConfig(name="good", workernames=["vm-worker"], factory=build(
        ["sh", "-c", "echo first step on $(hostname)"], ["sh", "-c", "echo second step done"])),
    util.BuilderConfig(name="bad", workernames=["vm-worker"], factory=build(
        ["sh", "-c", "echo about to fail; exit 3"])),
    util.BuilderConfig(name="slow", workernames=["vm-worker"], factory=build(
        ["sh", "-c", "echo sleeping; sleep 600"])),
]
c["www"] = {{"port": "tcp:{www}:interface=127.0.0.1", "plugins": {{}}}}
c["db"] = {{"db_url": "sqlite:///state.sqlite"}}
c["buildbotNetUsageData"] = None
"""
SUCCESS, FAILURE = 0, 2


@pytest.fixture
def master_reachable(settings: Settings) -> Settings:
    """Guests may reach the master's worker port on their bridge, and take their time."""
    network = dataclasses.replace(settings.network, guest_host_ports=(MASTER_PORT,))
    return dataclasses.replace(settings, network=network, ip_timeout=BOOT_TIMEOUT)


class Master:
    """A Buildbot master in a folder of its own, started and killed by PID."""

    def __init__(self, folder: Path, goldclone_url: str) -> None:
        self.folder = folder
        self.www = free_port()
        self.api = f"http://127.0.0.1:{self.www}/api/v2"
        self.process: asyncio.subprocess.Process | None = None
        subprocess.run([*BUILDBOT, "create-master", "-q", str(folder)], check=True)
        config = MASTER_CFG.format(url=goldclone_url, host=HOST, port=MASTER_PORT, www=self.www)
        (folder / "master.cfg").write_text(config)

    async def start(self) -> None:
        with (self.folder / "console.log").open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *BUILDBOT, "start", "--nodaemon", str(self.folder), stdout=log, stderr=log,
                cwd=self.folder,
            )  # fmt: skip
        async with asyncio.timeout(120), httpx.AsyncClient() as http:
            while True:
                assert self.process.returncode is None, self.log()
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get(f"{self.api}/builders")).status_code == 200:
                        return
                await asyncio.sleep(0.2)

    async def kill(self) -> None:
        """As a crash or an OOM kill would: no clean shutdown."""
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
            await self.process.wait()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 60)
            except TimeoutError:
                await self.kill()

    def log(self) -> str:
        twistd = self.folder / "twistd.log"
        return twistd.read_text()[-4000:] if twistd.exists() else "(no log)"

    async def builder_id(self, name: str) -> int:
        async with httpx.AsyncClient() as http:
            builders = (await http.get(f"{self.api}/builders")).json()["builders"]
        [found] = [b["builderid"] for b in builders if b["name"] == name]
        return int(found)

    async def force(self, builder: str) -> None:
        builder_id = await self.builder_id(builder)
        async with httpx.AsyncClient() as http:
            rpc = {"jsonrpc": "2.0", "method": "force", "id": 1,
                   "params": {"builderid": str(builder_id)}}  # fmt: skip
            answer = await http.post(f"{self.api}/forceschedulers/force", json=rpc)
            assert answer.status_code == 200, answer.text

    async def build(self, builder: str, number: int, *, finished: bool = True) -> dict[str, Any]:
        """The builder's build ``number``, once it has finished (or once it has started)."""
        url = f"{self.api}/builders/{await self.builder_id(builder)}/builds/{number}"
        async with asyncio.timeout(BOOT_TIMEOUT), httpx.AsyncClient() as http:
            while True:
                answer = await http.get(url)
                found = answer.json().get("builds") if answer.status_code == 200 else None
                if found and (found[0]["complete"] or not finished):
                    return dict(found[0])
                await asyncio.sleep(0.5)

    async def stop_build(self, build: dict[str, Any]) -> None:
        rpc = {"jsonrpc": "2.0", "method": "stop", "id": 1, "params": {"reason": "the test"}}
        async with httpx.AsyncClient() as http:
            answer = await http.post(f"{self.api}/builds/{build['buildid']}", json=rpc)
            assert answer.status_code == 200, answer.text

    async def until_output(self, build: dict[str, Any], text: str) -> None:
        async with asyncio.timeout(BOOT_TIMEOUT):
            while text not in await self.output(build):
                await asyncio.sleep(0.5)

    async def output(self, build: dict[str, Any]) -> str:
        async with httpx.AsyncClient() as http:
            base = f"{self.api}/builds/{build['buildid']}/steps"
            text = ""
            for step in (await http.get(base)).json()["steps"]:
                logs = (await http.get(f"{self.api}/steps/{step['stepid']}/logs")).json()["logs"]
                for found in logs:
                    raw = await http.get(f"{self.api}/logs/{found['logid']}/raw")
                    text += raw.text
            return text


@pytest.fixture
async def goldclone(master_reachable: Settings) -> AsyncIterator[Goldclone]:
    async with goldclone_server(master_reachable) as server:
        yield server


@pytest.fixture
async def master(tmp_path: Path, goldclone: Goldclone) -> AsyncIterator[Master]:
    found = Master(tmp_path / "master", str(goldclone.client.base_url))
    try:
        yield found
    finally:
        await found.stop()


async def vms(goldclone: Goldclone) -> list[dict[str, Any]]:
    return list((await goldclone.client.get("/vms")).json()["vms"])


async def until_no_vm(goldclone: Goldclone) -> None:
    async with asyncio.timeout(120):
        while await vms(goldclone):
            await asyncio.sleep(0.5)


async def test_buildbot_builds_in_fresh_vms_that_go_afterwards(
    goldclone: Goldclone,
    master: Master,
    file_server: FileServer,
    debian_qcow2: Path,
) -> None:
    image = {"url": file_server.url(debian_qcow2.name), "checksum": checksum(debian_qcow2)}
    await goldclone.put_pool("debian", {"image": image, "cpus": 1, "memory": 1024, "size": 1})
    await goldclone.wait_pool("debian", 1, timeout=2 * BOOT_TIMEOUT)
    await master.start()

    await master.force("good")
    good = await master.build("good", 1)
    assert good["results"] == SUCCESS, (good, master.log())
    said = await master.output(good)
    assert "first step on " in said and "second step done" in said, said
    await until_no_vm(goldclone)

    await master.force("bad")
    bad = await master.build("bad", 1)
    assert bad["results"] == FAILURE, (bad, master.log())
    assert "about to fail" in await master.output(bad)
    await until_no_vm(goldclone)

    await master.force("slow")
    slow = await master.build("slow", 1, finished=False)
    await master.until_output(slow, "sleeping")  # it runs in its VM
    [left] = await vms(goldclone)
    await master.kill()
    assert await vms(goldclone) == [left], "the VM outlives the master that was killed"
    await master.start()  # and deletes what it had left
    async with asyncio.timeout(120):
        while left["id"] in {vm["id"] for vm in await vms(goldclone)}:
            await asyncio.sleep(0.5)
    # Buildbot runs the build its master lost again, in a fresh VM: stopped, it takes its VM
    again = await master.build("slow", 2, finished=False)
    await master.until_output(again, "sleeping")
    await master.stop_build(again)
    await master.build("slow", 2)
    await until_no_vm(goldclone)
    await master.force("good")
    assert (await master.build("good", 2))["results"] == SUCCESS
    await until_no_vm(goldclone)
