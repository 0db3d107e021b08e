"""Any host of a fleet serves exec, ports, files and the console of any VM, relaying to the VM's
own host as the caller: three real servers on loopback on one PostgreSQL, the VM on the
middle one (the others have no room), each host's synthetic guests the real helper on this
machine. And the signature that carries the caller between hosts, attacked."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from goldclone import relay_auth
from goldclone.access import Principal, Role
from goldclone.client import APIError, AsyncClient
from goldclone.drivers.synthetic import SyntheticDriver, SyntheticHost
from goldclone.exec_protocol import ExecRequest
from goldclone.settings import Limits, Settings
from tests.fast.conftest import as_, goldclone_cli, settings_on, tokens
from tests.fast.test_ports import echo_server
from tests.harness import Goldclone, goldclone_server, port_forward
from tests.postgres import PostgresCluster

SECRET = "a-fleet-secret-of-the-test-0123456789"


@pytest.fixture
async def fleet(
    tmp_path: Path, postgres: PostgresCluster, request_body: dict[str, Any]
) -> AsyncIterator[tuple[Goldclone, Goldclone, Goldclone, str]]:
    """Hosts a, b and c, and a running VM of alice's, which b runs (a and c hold none)."""
    database = await postgres.new_database()

    def settings(name: str, room: bool) -> Settings:
        base = settings_on(tmp_path / name, database)
        return dataclasses.replace(
            base, host_id=name, tokens=tokens(), fleet_secret=SECRET, heartbeat_interval=0.2,
            limits=Limits(max_vms=None if room else 0),
        )  # fmt: skip

    async with contextlib.AsyncExitStack() as stack:
        servers = []
        for name in ("a", "b", "c"):
            driver = SyntheticDriver(tmp_path / name / "data", SyntheticHost(runs_commands=True))
            server = await stack.enter_async_context(
                goldclone_server(settings(name, name == "b"), driver, advertise=True)
            )
            server.client.headers.update(as_("alice"))
            servers.append(server)
        a, b, c = servers
        async with asyncio.timeout(10):  # each host has beaten with its URL
            while len([h for h in (await a.client.get("/hosts")).json()["hosts"] if h["url"]]) < 3:
                await asyncio.sleep(0.05)
        vm = await a.post_vm(request_body)
        assert vm["host"] == "b", vm
        await a.wait_for(vm["id"], "running")
        yield a, b, c, vm["id"]


def client_of(server: Goldclone, who: str = "alice") -> AsyncClient:
    return AsyncClient(str(server.client.base_url), token=as_(who)["Authorization"][7:])


async def test_exec_ports_files_and_the_console_through_any_host(
    fleet: tuple[Goldclone, Goldclone, Goldclone, str], tmp_path: Path
) -> None:
    a, _, c, vm = fleet
    for server in (a, c):
        async with client_of(server) as client:
            done = await client.exec(vm, ExecRequest(script="cat; echo err >&2; exit 4"), b"in")
            assert (done.stdout, done.stderr, done.result.exit_code) == (b"in", b"err\n", 4)
    async with echo_server() as port:
        token = as_("alice")["Authorization"][7:]
        async with port_forward(c, vm, port, token) as local:
            reader, writer = await asyncio.open_connection("127.0.0.1", local)
            writer.write(b"through c")
            writer.write_eof()
            assert (await reader.read()).decode() == hashlib.sha256(b"through c").hexdigest()
            writer.close()
    (tmp_path / "up.txt").write_bytes(b"a file" * 10000)
    guest = tmp_path / "guest"
    guest.mkdir()
    assert (
        await goldclone_cli(a, "cp", str(tmp_path / "up.txt"), f"{vm}:{guest}/")
    ).returncode == 0
    assert (guest / "up.txt").read_bytes() == b"a file" * 10000
    down = await goldclone_cli(c, "cp", f"{vm}:{guest}/up.txt", str(tmp_path / "down.txt"))
    assert down.returncode == 0 and (tmp_path / "down.txt").read_bytes() == b"a file" * 10000
    console = await a.client.get(f"/vms/{vm}/console")
    assert console.status_code == 200 and f"synthetic machine {vm} powered on" in console.text
    missing = await c.client.get(f"/vms/{vm}/files", params={"path": f"{guest}/nothing"})
    assert (missing.status_code, missing.json()["code"]) == (404, "path-not-found")


async def test_a_relayed_request_is_the_callers_own(
    fleet: tuple[Goldclone, Goldclone, Goldclone, str],
) -> None:
    a, _, _, vm = fleet
    async with client_of(a, "bob") as bob:  # another tenant: b finds no VM of bob's
        with pytest.raises(APIError) as other_tenant:
            await bob.exec(vm, ExecRequest(argv=["true"]))
        assert (other_tenant.value.status, other_tenant.value.code) == (404, "vm-not-found")
    files = await a.client.get(f"/vms/{vm}/files", params={"path": "/"}, headers=as_("bob"))
    assert files.status_code == 404
    async with client_of(a, "alice-reader") as reader:
        with pytest.raises(APIError) as read_only:
            await reader.exec(vm, ExecRequest(argv=["true"]))
        assert read_only.value.status == 403
    async with client_of(a, "root") as admin:
        assert (await admin.exec(vm, ExecRequest(argv=["true"]))).result.exit_code == 0


async def test_a_host_takes_only_relays_that_the_fleet_signed(
    fleet: tuple[Goldclone, Goldclone, Goldclone, str],
) -> None:
    """An attacker who reaches b's API directly, without a token: forging the caller."""
    _, b, _, vm = fleet
    admin = Principal("root", Role.ADMIN, "default")
    forged = {
        "wrong secret": relay_auth.sign("not-the-fleet-secret-0123456789abcdef", admin, "a"),
        "too old": relay_auth.sign(SECRET, admin, "a", at=time.time() - 600),
        "no signature": {relay_auth.HEADER: relay_auth.sign(SECRET, admin, "a")[relay_auth.HEADER]},
    }
    honest = relay_auth.sign(SECRET, admin, "a")
    tampered = dict(honest)
    tampered[relay_auth.HEADER] = relay_auth.sign(SECRET, admin, "z")[relay_auth.HEADER]
    forged["another caller under a signature"] = {
        relay_auth.HEADER: tampered[relay_auth.HEADER],
        relay_auth.SIGNATURE: honest[relay_auth.SIGNATURE],
    }
    async with httpx.AsyncClient(base_url=str(b.client.base_url)) as raw:
        for case, headers in forged.items():
            response = await raw.get("/vms", headers=headers)
            assert response.status_code == 401, case
            assert response.json()["code"] == "unauthorized", case
        assert (await raw.get("/vms", headers=honest)).status_code == 200
        ws = str(b.client.base_url).replace("http://", "ws://") + f"/vms/{vm}/exec"
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(ws, additional_headers=forged["wrong secret"])
        assert refused.value.response.status_code == 401


async def test_without_the_fleet_secret_a_host_says_where_the_vm_is(
    tmp_path: Path, postgres: PostgresCluster, request_body: dict[str, Any]
) -> None:
    database = await postgres.new_database()
    async with contextlib.AsyncExitStack() as stack:
        servers = []
        for name in ("a", "b"):
            settings = dataclasses.replace(
                settings_on(tmp_path / name, database), host_id=name,
                limits=Limits(max_vms=None if name == "b" else 0),
            )  # fmt: skip
            driver = SyntheticDriver(settings.data_dir, SyntheticHost(runs_commands=True))
            servers.append(await stack.enter_async_context(goldclone_server(settings, driver)))
        a, _ = servers
        vm = await a.post_vm(request_body)
        await a.wait_for(vm["id"], "running")
        async with AsyncClient(str(a.client.base_url)) as client:
            with pytest.raises(APIError) as unavailable:
                await client.exec(vm["id"], ExecRequest(argv=["true"]))
        assert unavailable.value.code == "exec-unavailable"
        assert "runs on host b" in unavailable.value.message


def test_a_signature_verifies_only_as_signed() -> None:
    who = Principal("alice", Role.USER, "team-a")
    headers = relay_auth.sign(SECRET, who, "a", at=1000.0)
    verified = relay_auth.verify(SECRET, headers, now=1030.0)
    assert (verified.role, verified.tenant, verified.relayed) == (Role.USER, "team-a", True)
    assert verified.name == "alice (through a)"
    with pytest.raises(relay_auth.RelayRefused):
        relay_auth.verify(SECRET, headers, now=1000.0 + relay_auth.MAX_AGE + 1)
    with pytest.raises(relay_auth.RelayRefused):
        relay_auth.verify(SECRET + "x", headers, now=1000.0)
