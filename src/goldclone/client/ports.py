"""A guest's TCP port on a local one: each connection to the local port is carried through its
own WebSocket (``GET /vms/{id}/ports/{port}``) to the VM's host, which connects to the guest."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from urllib.parse import quote

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from goldclone.client.errors import ClientError
from goldclone.client.exec import open_websocket

READ_BYTES = 64 * 1024


async def open_tunnel(
    url: str, headers: Mapping[str, str], vm_id: str, port: int
) -> ClientConnection:
    """A WebSocket to the guest's ``port``; raises ``APIError`` (the VM, its helper) and
    ``ServerUnreachable``."""
    return await open_websocket(url, headers, f"/vms/{quote(vm_id, safe='')}/ports/{port}")


async def carry(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tunnel: ClientConnection
) -> str | None:
    """Bytes both ways between a local connection and a tunnel until the server closes the
    tunnel (the guest's end closed); why, when it closed it with an error (the guest
    refused the connection), else ``None``."""

    async def outward() -> None:
        while data := await reader.read(READ_BYTES):
            await tunnel.send(data)
        await tunnel.send(b"")  # the local side is done sending

    sending = asyncio.create_task(outward())
    try:
        with contextlib.suppress(ConnectionClosed):
            async for message in tunnel:
                if isinstance(message, bytes):
                    writer.write(message)
                    await writer.drain()
    finally:
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        await tunnel.close()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if tunnel.close_code not in (None, 1000):
        return tunnel.close_reason or f"the server closed the tunnel with {tunnel.close_code}"
    return None


async def forward(
    url: str,
    headers: Mapping[str, str],
    vm_id: str,
    remote: int,
    listen: tuple[str, int],
    on_ready: Callable[[int], None],
    on_refused: Callable[[str], None],
) -> None:
    """Serve ``listen`` (a port of 0 takes a free one, given to ``on_ready``) until
    cancelled, each connection to the guest's ``remote`` port; ``on_refused`` hears why one
    could not be made."""

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            tunnel = await open_tunnel(url, headers, vm_id, remote)
        except ClientError as exc:  # this connection's failure: the next one may work
            on_refused(str(exc))
            writer.close()
            return
        with contextlib.suppress(ConnectionClosed, OSError):
            if (why := await carry(reader, writer, tunnel)) is not None:
                on_refused(why)

    server = await asyncio.start_server(connection, *listen)
    async with server:
        on_ready(server.sockets[0].getsockname()[1])
        await server.serve_forever()
