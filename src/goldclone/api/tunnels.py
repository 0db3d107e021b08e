"""A guest's TCP port through a WebSocket (``GET /vms/{id}/ports/{port}``): each binary
message is bytes of the connection, an empty one the end of what the client sends."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import WebSocket, WebSocketDisconnect

from goldclone.errors import ExecFailed
from goldclone.guest.channel import Channel, Exit, Session

CLOSE_REASON_BYTES = 120
"""A close frame's reason has room for 123 bytes."""


async def tunnel(websocket: WebSocket, channel: Channel, port: int) -> None:
    """Connect to the guest's ``port`` and carry bytes both ways until the guest's end
    closes (the socket then closes with 1000, or 1011 and why: the guest would not connect,
    the VM stopped) or the client goes."""
    try:
        session = await channel.session({"connect": port})
    except ExecFailed as exc:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            await websocket.close(1011, exc.message[:CLOSE_REASON_BYTES])
        return
    to_client = asyncio.create_task(_to_client(websocket, session))
    to_guest = asyncio.create_task(_to_guest(websocket, session))
    try:
        done, _ = await asyncio.wait({to_client, to_guest}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (to_client, to_guest):
            task.cancel()
        await asyncio.gather(to_client, to_guest, return_exceptions=True)
        await session.close()
    if to_client not in done:
        return  # the client went
    if isinstance(error := to_client.exception(), ExecFailed):
        code, reason = 1011, error.message
    elif error is not None:
        return  # the client went as its bytes were sent
    else:
        ended = to_client.result()
        code, reason = (1000, "") if ended.error is None else (1011, ended.error)
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
        await websocket.close(code, reason[:CLOSE_REASON_BYTES])


async def _to_client(websocket: WebSocket, session: Session) -> Exit:
    while not isinstance(item := await session.receive(), Exit):
        if item.data:
            await websocket.send_bytes(item.data)
        await session.consumed(len(item.data))
    return item


async def _to_guest(websocket: WebSocket, session: Session) -> None:
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("bytes")
        if data is None:
            continue  # text: not bytes of the connection
        await (session.write(data) if data else session.end_input())
