"""Runs the real goldclone server in-process on loopback, and checks what it leaves behind."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import signal
import socket
import sqlite3
import stat
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from goldclone.clock import rfc3339_ms
from goldclone.drivers.base import Driver
from goldclone.drivers.qemu.bounds import group_name
from goldclone.drivers.qemu.network import Networks
from goldclone.drivers.qemu.network.manager import tap_name
from goldclone.host.cgroups import Cgroups
from goldclone.host.commands import run
from goldclone.server import WEBSOCKETS, build_app
from goldclone.settings import Settings
from goldclone.store.tables import vms
from tests.serving import GOLDCLONE

BOOT_TIMEOUT = 180.0


class ApiCalls:
    """The API calls the tests make, over ``self.client``, asserting the documented answers."""

    client: httpx.AsyncClient
    poll = 0.1
    """Seconds between two GETs while waiting."""

    async def post_vm(self, body: dict[str, Any]) -> dict[str, Any]:
        response = await self.client.post("/vms", json=body)
        assert response.status_code == 202, response.text
        vm: dict[str, Any] = response.json()
        return vm

    async def boot(self, body: dict[str, Any]) -> dict[str, Any]:
        """Create a VM and wait until it is running (or has failed)."""
        vm = await self.post_vm(body)
        return await self.wait_for(vm["id"], "running", "error")

    async def wait_for(
        self, vm_id: str, *statuses: str, timeout: float = BOOT_TIMEOUT
    ) -> dict[str, Any]:
        """Poll ``GET /vms/{id}`` until the VM reaches one of ``statuses``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            response = await self.client.get(f"/vms/{vm_id}")
            assert response.status_code == 200, response.text
            vm: dict[str, Any] = response.json()
            if vm["status"] in statuses:
                return vm
            assert vm["status"] in ("creating", "running"), vm
            if loop.time() > deadline:
                raise AssertionError(f"VM still {vm['status']} after {timeout} s: {vm}")
            await asyncio.sleep(self.poll)

    async def wait_for_phase(self, vm_id: str, phase: str, timeout: float = BOOT_TIMEOUT) -> None:
        """Poll until the VM's timeline has reached ``phase``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            vm = (await self.client.get(f"/vms/{vm_id}")).json()
            if phase in [entry["phase"] for entry in vm["timeline"]]:
                return
            if loop.time() > deadline:
                raise AssertionError(f"VM never reached {phase}: {vm}")
            await asyncio.sleep(self.poll / 2)

    async def put_pool(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self.client.put(f"/pools/{name}", json=body)
        assert response.status_code in (200, 201), response.text
        pool: dict[str, Any] = response.json()
        return pool

    async def wait_pool(
        self, name: str, ready: int, timeout: float = BOOT_TIMEOUT
    ) -> dict[str, Any]:
        """Poll ``GET /pools/{name}`` until the pool has ``ready`` VMs ready, none filling,
        and no error (its keeper clears one after the fill that mends it)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            response = await self.client.get(f"/pools/{name}")
            assert response.status_code == 200, response.text
            pool: dict[str, Any] = response.json()
            if (pool["ready"], pool["filling"], pool["error"]) == (ready, 0, None):
                return pool
            if loop.time() > deadline:
                raise AssertionError(f"pool not at {ready} ready after {timeout} s: {pool}")
            await asyncio.sleep(self.poll)

    async def delete(self, vm_id: str) -> None:
        response = await self.client.delete(f"/vms/{vm_id}")
        assert response.status_code == 204, response.text
        assert response.content == b""


class Goldclone(ApiCalls):
    """One goldclone server over a data dir; it can be stopped and started again."""

    def __init__(
        self, settings: Settings, driver: Driver | None = None, advertise: bool = False
    ) -> None:
        self.settings = settings
        self.driver = driver
        self.advertise = advertise
        """Whether it advertises its own URL to the fleet (known once it has its port)."""
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.client = httpx.AsyncClient(timeout=30)

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir

    async def start(self) -> None:
        # IPPROTO_TCP, so that asyncio sets TCP_NODELAY: otherwise Nagle's algorithm and the
        # client's delayed ACK hold every response ~40 ms (bench/RESULTS.md)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        self.settings = dataclasses.replace(self.settings, port=port)
        if self.advertise:
            url = f"http://127.0.0.1:{port}"
            self.settings = dataclasses.replace(self.settings, advertise_url=url)
        app = build_app(self.settings, driver=self.driver)
        config = uvicorn.Config(app, log_level="warning", lifespan="on", ws=WEBSOCKETS)
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise AssertionError("the server stopped during start-up")
            await asyncio.sleep(0.01)
        token = self.settings.api_tokens[0] if self.settings.api_tokens else None
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=30, headers=auth
        )

    async def stop(self) -> None:
        """Stop the server gracefully; running VMs stay, as after a restart of the service."""
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
        self._server = self._task = None
        await self.client.aclose()

    def cgroups(self) -> Cgroups:
        """The cgroups of this service's machines."""
        found = Cgroups.find(group_name(self.data_dir))
        assert found is not None, "this host has no cgroups to use"
        return found

    async def remove_networks(self) -> None:
        """The QEMU driver's networks, which outlive the service; other drivers make none."""
        if self.settings.driver == "qemu":
            await Networks(self.settings.network, self.data_dir.absolute() / "networks").teardown()


@asynccontextmanager
async def goldclone_server(
    settings: Settings, driver: Driver | None = None, advertise: bool = False
) -> AsyncIterator[Goldclone]:
    """A started server; on exit every pool and VM is deleted and every network removed."""
    server = Goldclone(settings, driver, advertise)
    await server.start()
    try:
        yield server
    finally:
        if server._server is None:
            await server.start()
        for pool in (await server.client.get("/pools")).json()["pools"]:
            await server.client.delete(f"/pools/{pool['name']}")  # with what it was restoring
        for vm in (await server.client.get("/vms")).json()["vms"]:
            await server.client.delete(f"/vms/{vm['id']}")
        await server.stop()
        await server.remove_networks()


async def read_until(output: AsyncIterator[tuple[int, bytes]], end: bytes) -> bytes:
    """What ``output`` streams until it ends with ``end`` (output comes in pieces of any
    size); all of it if it ends first."""
    seen = b""
    async for _, data in output:
        seen += data
        if seen.endswith(end):
            break
    return seen


@asynccontextmanager
async def port_forward(
    server: Goldclone, vm_id: str, remote: int, token: str | None = None
) -> AsyncIterator[int]:
    """``goldclone port-forward VM 0:REMOTE`` running; the local port it chose. On exit it is
    stopped with SIGINT, as Ctrl-C does, and must end with 0 (killed by PID should it not)."""
    env = {**os.environ, "GOLDCLONE_URL": str(server.client.base_url),
           **({"GOLDCLONE_TOKEN": token} if token else {})}  # fmt: skip
    cli = await asyncio.create_subprocess_exec(
        *GOLDCLONE, "port-forward", vm_id, f"0:{remote}", env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert cli.stdout is not None
        line = (await asyncio.wait_for(cli.stdout.readline(), 60)).decode()
        assert line.startswith("forwarding 127.0.0.1:"), line
        yield int(line.split()[1].rsplit(":", 1)[1])
        cli.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(cli.wait(), 30) == 0
    finally:
        if cli.returncode is None:
            cli.kill()
            await cli.wait()


def tree(root: Path) -> dict[str, tuple[int, str]]:
    """Each file and folder under ``root``: its mode, and its content's sha256."""
    found = {}
    for path in sorted(root.rglob("*")):
        mode = stat.S_IMODE(path.lstat().st_mode)
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
        found[str(path.relative_to(root))] = (mode, digest)
    return found


def make_folder(root: Path) -> Path:
    folder = root / "job"
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "build.sh").write_text("#!/bin/sh\necho built\n")
    (folder / "bin" / "build.sh").chmod(0o755)
    (folder / "secret.key").write_bytes(os.urandom(64))
    (folder / "secret.key").chmod(0o600)
    (folder / "big.bin").write_bytes(os.urandom(50 * 1000 * 1000))
    return folder


async def cli(
    server: Goldclone, *args: str, stdin: bytes = b"", token: str | None = None
) -> subprocess.CompletedProcess[bytes]:
    """The ``goldclone`` command against ``server``, in a thread (the server answers from the
    test's own loop)."""
    env = {**os.environ, "GOLDCLONE_URL": str(server.client.base_url),
           **({"GOLDCLONE_TOKEN": token} if token else {})}  # fmt: skip
    return await asyncio.to_thread(
        subprocess.run, [*GOLDCLONE, *args], input=stdin, env=env, capture_output=True,
        timeout=120,
    )  # fmt: skip


def settled(vm: dict[str, Any]) -> dict[str, Any]:
    """``vm`` without what changes while it runs (``dropped_packets``, which only ``GET
    /vms/{id}`` fills in), to compare it with the same VM read at another moment."""
    return {key: value for key, value in vm.items() if key != "dropped_packets"}


def processes_mentioning(text: str) -> list[int]:
    """PIDs of processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            found.append(int(entry.name))
    return found


async def disk_info(disk: Path) -> dict[str, Any]:
    """``qemu-img info`` of ``disk``, also while a running QEMU holds its lock (``-U``)."""
    _, out, _ = await run("qemu-img", "info", "-U", "--output=json", str(disk), timeout=30)
    return dict(json.loads(out))


def forget(data_dir: Path, vm_id: str) -> None:
    """Delete the VM's record behind a stopped service's back, as if the store had lost it."""
    db = sqlite3.connect(data_dir / "state.db")
    with db:
        db.execute("DELETE FROM vms WHERE id = ?", (vm_id,))
    db.close()


def links() -> list[str]:
    """The names of this namespace's network interfaces (``/sys/class/net`` shows the host's)."""
    out = subprocess.run(["ip", "-j", "link", "show"], check=True, capture_output=True, text=True)
    return [link["ifname"] for link in json.loads(out.stdout)]


def leftovers(data_dir: Path, vm: dict[str, Any]) -> list[str]:
    """Everything of a deleted or failed VM that is still there; empty when all is clean."""
    vm_id, found = vm["id"], []
    if pids := processes_mentioning(vm_id):
        found.append(f"processes {pids}")
    if (data_dir / "vms" / vm_id).exists():
        found.append(f"folder vms/{vm_id}")
    if tap_name(vm_id) in links():
        found.append(f"tap {tap_name(vm_id)}")
    for leases in (data_dir / "networks").glob("*/*leases*"):
        for line in leases.read_text().splitlines():
            if (vm.get("mac_address") or "-") in line or f" {vm.get('ip_address') or '-'} " in line:
                found.append(f"lease in {leases.name}: {line}")
    downloads = data_dir / "downloads"
    if downloads.is_dir() and (partial := list(downloads.iterdir())):
        found.append(f"downloads {partial}")
    if staging := list((data_dir / "images").glob(".tmp-*")):
        found.append(f"half-made images {staging}")
    return found


LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)


async def set_expiry(database_url: str, vm_id: str, when: datetime) -> None:
    """Move a stopped service's VM's lease into the past, as time passing would."""
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as conn:
            row = (await conn.execute(select(vms.c.vm).where(vms.c.id == vm_id))).one()
            await conn.execute(vms.update().where(vms.c.id == vm_id).values(
                vm={**row.vm, "expires_at": rfc3339_ms(when)}, expires_at=when,
            ))  # fmt: skip
    finally:
        await engine.dispose()
