"""``GET /vms/{id}/ports/{port}`` and ``goldclone port-forward`` over a real server on
loopback; the synthetic driver's guest is the real helper on this host, so "the guest's port"
is a port of this host (in the test run's own network namespace)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import websockets
from websockets.exceptions import ConnectionClosedError, InvalidStatus

from goldclone.client.ports import open_tunnel
from tests.fast.conftest import as_
from tests.harness import Goldclone, port_forward


@asynccontextmanager
async def echo_server() -> AsyncIterator[int]:
    """A TCP server that answers each connection with the sha256 of all it was sent, once
    the client stops sending (so it also shows that the end of sending gets through)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        digest = hashlib.sha256()
        while data := await reader.read(65536):
            digest.update(data)
        writer.write(digest.hexdigest().encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def test_a_tunnel_carries_bytes_both_ways_and_the_end_of_sending(
    helper_server: Goldclone, helper_vm: str
) -> None:
    payload = os.urandom(5 * 1000 * 1000)
    async with echo_server() as port:
        url, headers = str(helper_server.client.base_url), as_("alice")
        tunnel = await open_tunnel(url, headers, helper_vm, port)
        for start in range(0, len(payload), 1 << 20):
            await tunnel.send(payload[start : start + (1 << 20)])
        await tunnel.send(b"")
        answer = b"".join([message async for message in tunnel if isinstance(message, bytes)])
    assert answer.decode() == hashlib.sha256(payload).hexdigest()
    assert tunnel.close_code == 1000


async def test_a_port_nothing_listens_on_closes_the_tunnel_saying_why(
    helper_server: Goldclone, helper_vm: str
) -> None:
    async with echo_server() as port:
        pass  # closed: nothing listens there now
    url, headers = str(helper_server.client.base_url), as_("alice")
    tunnel = await open_tunnel(url, headers, helper_vm, port)
    with pytest.raises(ConnectionClosedError):
        await tunnel.recv()
    assert tunnel.close_code == 1011
    assert f"cannot connect to port {port} in the guest" in (tunnel.close_reason or "")


async def test_ports_are_refused_as_exec_is(helper_server: Goldclone, helper_vm: str) -> None:
    base = str(helper_server.client.base_url).replace("http://", "ws://")
    for path, headers, status in (
        (f"/vms/{helper_vm}/ports/80", {}, 401),
        (f"/vms/{helper_vm}/ports/80", as_("alice-reader"), 403),
        (f"/vms/{helper_vm}/ports/80", as_("bob"), 404),
        (f"/vms/{helper_vm}/ports/70000", as_("alice"), 400),
        (f"/vms/{helper_vm}/ports/http", as_("alice"), 400),
    ):
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(base + path, additional_headers=headers)
        assert refused.value.response.status_code == status, (path, headers)


async def test_the_cli_forwards_a_local_port_until_ctrl_c(
    helper_server: Goldclone, helper_vm: str
) -> None:
    token = as_("alice")["Authorization"][7:]
    async with echo_server() as port, port_forward(helper_server, helper_vm, port, token) as local:
        for text in (b"one", b"two" * 100000):
            reader, writer = await asyncio.open_connection("127.0.0.1", local)
            writer.write(text)
            writer.write_eof()
            assert (await reader.read()).decode() == hashlib.sha256(text).hexdigest()
            writer.close()
