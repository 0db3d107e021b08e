"""Three goldclone hosts on one PostgreSQL server: each a real ``goldclone serve`` in a network
namespace of its own, with its own data dir, bridges, dnsmasq and QEMU guests (the demo guest,
under TCG). The test reaches each host through a veth pair between its namespace and the
test's, and each host reaches the others' image URLs the same way."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from goldclone.host import processes
from goldclone.host.commands import run
from tests.conftest import checksum
from tests.harness import processes_mentioning
from tests.postgres import PostgresCluster
from tests.servers import FileServer
from tests.serving import GOLDCLONE

pytestmark = pytest.mark.root

PER_HOST = 4
LOST_AFTER = 20
"""Seconds: with 24 guests booting on two cores, a host's heartbeat of every second came over
6 s late once."""
PORT = 12345
BOOT_TIMEOUT = 600.0
"""24 demo guests booting at once on two cores under TCG."""


class Host:
    """One host: a network namespace joined to the test's by a veth pair (``outer`` on the
    test's side, ``inner`` on the host's, which it serves on), and ``goldclone serve`` in it,
    started, killed and stopped by its PID."""

    def __init__(self, index: int, root: Path, database_url: str, token: str) -> None:
        self.id = f"host-{index}"
        self.netns = f"gct{token}-{index}"
        self._veth = (f"gcv{index}{token}", f"gcw{index}{token}")
        self.outer, self.inner = f"10.201.{index}.1", f"10.201.{index}.2"
        self.data_dir = Path(tempfile.mkdtemp(prefix=f"h{index}", dir=root))
        self.log = root / f"{self.id}.log"
        self._env = {
            "GOLDCLONE_DATABASE_URL": database_url, "GOLDCLONE_HOST_ID": self.id,
            "GOLDCLONE_MAX_VMS": str(PER_HOST), "GOLDCLONE_HEARTBEAT_INTERVAL": "1",
            "GOLDCLONE_HOST_LOST_AFTER": str(LOST_AFTER), "GOLDCLONE_ACCEL": "tcg",
            "GOLDCLONE_SHUTDOWN_TIMEOUT": "5", "GOLDCLONE_IP_TIMEOUT": str(BOOT_TIMEOUT),
        }  # fmt: skip
        self._proc: asyncio.subprocess.Process | None = None
        self.client = httpx.AsyncClient(base_url=f"http://{self.inner}:{PORT}", timeout=120)

    def make_namespace(self) -> None:
        outside, inside = self._veth
        for argv in (
            ["ip", "netns", "add", self.netns],
            ["ip", "link", "add", outside, "type", "veth", "peer", "name", inside],
            ["ip", "link", "set", inside, "netns", self.netns],
            ["ip", "addr", "add", f"{self.outer}/30", "dev", outside],
            ["ip", "link", "set", outside, "up"],
            *(
                ["ip", "netns", "exec", self.netns, *command]
                for command in (
                    ["ip", "link", "set", "lo", "up"],
                    ["ip", "addr", "add", f"{self.inner}/30", "dev", inside],
                    ["ip", "link", "set", inside, "up"],
                    ["ip", "route", "add", "default", "via", self.outer],
                )
            ),
        ):
            subprocess.run(argv, check=True, capture_output=True)

    async def start(self) -> None:
        """Serve, and return once ``GET /healthz`` answers."""
        argv = ["ip", "netns", "exec", self.netns, *GOLDCLONE, "serve", "--host", self.inner,
                "--port", str(PORT), "--data-dir", str(self.data_dir)]  # fmt: skip
        with self.log.open("ab") as log:
            self._proc = await asyncio.create_subprocess_exec(
                *argv, env={**os.environ, **self._env}, stdout=log, stderr=log
            )
        async with asyncio.timeout(120):
            while True:
                assert self._proc.returncode is None, f"{self.id} exited: {self.log.read_text()}"
                with contextlib.suppress(httpx.TransportError):
                    if (await self.client.get("/healthz")).status_code == 200:
                        return
                await asyncio.sleep(0.1)

    async def kill(self) -> None:
        """``kill -9`` the service (its guests run on)."""
        assert self._proc is not None
        self._proc.kill()
        await self._proc.wait()
        self._proc = None

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):  # it may exit meanwhile
            proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(60):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()

    def qemus(self) -> list[str]:
        """The machine (the VM ID) of each QEMU of this host's data dir."""
        found = (processes.argv(pid) for pid in processes_mentioning(str(self.data_dir)))
        return [_machine(argv) for argv in found if argv is not None and "qemu-system" in argv[0]]

    async def remove(self) -> None:
        """Stop the service, end whatever of its data dir still runs (by PID: the service
        too, if it would not stop), and remove its namespace, with the bridges and taps in
        it."""
        try:
            await self.stop()
        finally:
            self._end_the_rest()
            await run("ip", "netns", "del", self.netns, check=False)
            await run("ip", "link", "del", self._veth[0], check=False)

    def _end_the_rest(self) -> None:
        for pid in processes_mentioning(str(self.data_dir)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _machine(qemu_argv: list[str]) -> str:
    name = qemu_argv[qemu_argv.index("-name") + 1]
    return name.removeprefix("goldclone-")


@pytest.fixture
async def fleet(postgres: PostgresCluster, workdir: Path) -> AsyncIterator[tuple[Host, Host, Host]]:
    url = await postgres.new_database()
    token = secrets.token_hex(2)
    hosts = [Host(index, workdir, url, token) for index in (1, 2, 3)]
    try:
        for host in hosts:
            host.make_namespace()
        # each start runs to its end (none is left starting while the others are removed)
        started = await asyncio.gather(*(host.start() for host in hosts), return_exceptions=True)
        if failed := [error for error in started if isinstance(error, BaseException)]:
            raise failed[0]
        yield hosts[0], hosts[1], hosts[2]
    finally:
        removed = await asyncio.gather(*(host.remove() for host in hosts), return_exceptions=True)
        for host in hosts:
            await host.client.aclose()
            if host.log.exists():  # pytest shows it when the test fails
                print(
                    f"--- the end of {host.id}'s log ---",
                    *host.log.read_text().splitlines()[-40:],
                    sep="\n",
                )
        assert not [error for error in removed if error is not None], removed


@pytest.fixture
def image(demo_package: Path) -> Iterator[Callable[[Host], dict[str, str]]]:
    """The demo image, served on every address of the test's namespace: as each host sees
    it."""
    with FileServer(demo_package.parent, address="0.0.0.0").running() as server:
        yield lambda host: {"url": server.url(demo_package.name, at=host.outer),
                            "checksum": checksum(demo_package)}  # fmt: skip


async def wait_running(host: Host, vm_id: str) -> dict[str, Any]:
    async with asyncio.timeout(BOOT_TIMEOUT):
        while True:
            vm: dict[str, Any] = (
                await host.client.get(f"/vms/{vm_id}?wait=true&timeout=60")
            ).json()
            if vm["status"] != "creating":
                assert vm["status"] == "running", vm
                return vm


async def hosts_seen(host: Host) -> dict[str, dict[str, Any]]:
    return {found["id"]: found for found in (await host.client.get("/hosts")).json()["hosts"]}


@pytest.mark.timeout(1200)
async def test_three_hosts_place_a_burst_within_their_totals_and_outlive_a_killed_host(
    fleet: tuple[Host, Host, Host], image: Callable[[Host], dict[str, str]]
) -> None:
    h1, h2, h3 = fleet
    body = {"cpus": 1, "memory": 128}

    # an image that only host 2 holds: a create through host 1 goes there
    assert (await h2.client.post("/images", json=image(h2))).status_code == 202
    async with asyncio.timeout(120):
        while not (await hosts_seen(h1))["host-2"]["images"]:
            await asyncio.sleep(0.2)
    vm = (await h1.client.post("/vms", json={**body, "image": image(h1)})).json()
    assert vm["host"] == "host-2", vm
    vm = await wait_running(h3, vm["id"])  # read and waited for through host 3
    assert len(h2.qemus()) == 1 and h1.qemus() == h3.qemus() == []
    assert (await h3.client.delete(f"/vms/{vm['id']}")).status_code == 204
    assert h2.qemus() == []

    # concurrent creates, round-robin: each host takes its PER_HOST, and the last 3 are refused
    fleet_hosts = (h1, h2, h3)
    answers = await asyncio.gather(
        *(fleet_hosts[i % 3].client.post("/vms", json={**body, "image": image(fleet_hosts[i % 3])})
          for i in range(3 * PER_HOST + 3))
    )  # fmt: skip
    assert Counter(a.status_code for a in answers) == {202: 3 * PER_HOST, 409: 3}
    assert {a.json()["code"] for a in answers if a.status_code == 409} == {"capacity-exceeded"}
    accepted = [a.json() for a in answers if a.status_code == 202]
    running = await asyncio.gather(*(wait_running(h3, vm["id"]) for vm in accepted))
    by_host = Counter(vm["host"] for vm in running)
    assert by_host == {"host-1": PER_HOST, "host-2": PER_HOST, "host-3": PER_HOST}
    seen = await hosts_seen(h1)
    for host in fleet_hosts:
        assert seen[host.id]["used"]["vms"] == PER_HOST and seen[host.id]["free"]["vms"] == 0
        assert len(host.qemus()) == PER_HOST  # the database's count is the host's
        addresses = {vm["ip_address"] for vm in running if vm["host"] == host.id}
        assert len(addresses) == PER_HOST

    # kill -9 host 2: it is lost and its VMs unknown; started again, it adopts them
    before = {vm["id"]: vm["ip_address"] for vm in running if vm["host"] == "host-2"}
    await h2.kill()
    async with asyncio.timeout(LOST_AFTER * 3):
        while (await hosts_seen(h1))["host-2"]["state"] != "lost":
            await asyncio.sleep(0.2)
    listed = (await h1.client.get("/vms")).json()["vms"]
    assert {vm["id"] for vm in listed if vm["status"] == "unknown"} == set(before)
    assert len(h2.qemus()) == PER_HOST  # the guests ran on
    await h2.start()
    listed = (await h3.client.get("/vms")).json()["vms"]
    after = {vm["id"]: vm for vm in listed if vm["host"] == "host-2"}
    assert {vm_id: vm["ip_address"] for vm_id, vm in after.items()} == before
    assert {vm["status"] for vm in after.values()} == {"running"}
    assert (await hosts_seen(h3))["host-2"]["used"]["vms"] == PER_HOST
    assert len(h2.qemus()) == PER_HOST

    # every VM deleted through host 3: nothing is left on any host
    deleted = await asyncio.gather(*(h3.client.delete(f"/vms/{vm['id']}") for vm in running))
    assert {d.status_code for d in deleted} == {204}
    assert (await h1.client.get("/vms")).json()["vms"] == []
    assert [host.qemus() for host in fleet_hosts] == [[], [], []]


@pytest.mark.timeout(1200)
async def test_two_hosts_killed_during_a_burst_lose_no_vm_and_run_none_twice(
    fleet: tuple[Host, Host, Host], image: Callable[[Host], dict[str, str]]
) -> None:
    h1, h2, h3 = fleet
    fleet_hosts = (h1, h2, h3)
    burst = 3 * PER_HOST

    async def create(i: int) -> httpx.Response | BaseException:
        host = fleet_hosts[i % 3]
        try:
            return await host.client.post("/vms", json={"cpus": 1, "memory": 128,
                                                        "image": image(host)})  # fmt: skip
        except httpx.TransportError as cut:  # its host was killed under it
            return cut

    sent = asyncio.gather(*(create(i) for i in range(burst)))
    async with asyncio.timeout(120):  # kill the two once a third of the burst is recorded
        while len((await h2.client.get("/vms")).json()["vms"]) < burst // 3:
            await asyncio.sleep(0.05)
    await asyncio.gather(h1.kill(), h3.kill())
    answers = await sent
    await asyncio.gather(h1.start(), h3.start())

    accepted = {
        a.json()["id"] for a in answers if isinstance(a, httpx.Response) and a.status_code == 202
    }
    refused = [a for a in answers if isinstance(a, httpx.Response) and a.status_code != 202]
    assert {a.json()["code"] for a in refused} <= {"capacity-exceeded"}, [a.text for a in refused]
    async with asyncio.timeout(BOOT_TIMEOUT):  # every create ends, on its own host
        while True:
            listed = (await h2.client.get("/vms")).json()["vms"]
            if {vm["status"] for vm in listed} <= {"running", "error"}:
                break
            await asyncio.sleep(0.5)
    records = {vm["id"]: vm for vm in listed}
    assert accepted <= set(records)  # no VM lost: each one accepted has its record
    failed = {vm["id"]: vm["error"] for vm in listed if vm["status"] == "error"}
    assert {error["code"] for error in failed.values()} <= {"interrupted"}, failed
    assert [vm for vm in listed if vm["status"] == "running"], listed
    machines = [machine for host in fleet_hosts for machine in host.qemus()]
    assert len(machines) == len(set(machines))  # none runs twice
    for host in fleet_hosts:  # each QEMU is a running VM of its host's, and the other way round
        running = {vm["id"] for vm in listed if vm["host"] == host.id and vm["status"] == "running"}
        with contextlib.suppress(TimeoutError):  # an interrupted create's machine may still go
            async with asyncio.timeout(30):
                while set(host.qemus()) != running:
                    await asyncio.sleep(0.2)
        assert set(host.qemus()) == running, host.id
    deleted = await asyncio.gather(*(h1.client.delete(f"/vms/{vm_id}") for vm_id in records))
    assert {d.status_code for d in deleted} == {204}
    assert [host.qemus() for host in fleet_hosts] == [[], [], []]
