"""``GET /vms/{id}/exec`` from the client's side: a session to stream through, or a command run
to its end with its output collected."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from goldclone import exec_protocol
from goldclone.client.errors import ServerUnreachable, error_of
from goldclone.exec_protocol import ExecRequest, ExecResult

OPEN_TIMEOUT = 30.0


class ExecSession:
    """A command running in a guest: write its input, read its output until its result."""

    def __init__(self, socket: ClientConnection) -> None:
        self._socket = socket
        self.result: ExecResult | None = None

    @classmethod
    async def open(
        cls, url: str, headers: Mapping[str, str], vm_id: str, request: ExecRequest
    ) -> ExecSession:
        """Connect to the API at ``url`` and start ``request``; raises ``APIError`` as any
        call does (the VM is not found, has no helper...) and ``ServerUnreachable``."""
        socket = await open_websocket(url, headers, f"/vms/{quote(vm_id, safe='')}/exec")
        await socket.send(request.model_dump_json(exclude_none=True))
        return cls(socket)

    async def write(self, data: bytes) -> None:
        """Send ``data`` to the command's stdin; empty: its end."""
        if not data:
            await self._send(exec_protocol.STDIN, b"")
        for start in range(0, len(data), exec_protocol.MAX_INPUT_FRAME):
            chunk = data[start : start + exec_protocol.MAX_INPUT_FRAME]
            await self._send(exec_protocol.STDIN, chunk)

    async def resize(self, rows: int, cols: int) -> None:
        await self._send(exec_protocol.RESIZE, json.dumps({"rows": rows, "cols": cols}).encode())

    async def output(self) -> AsyncIterator[tuple[int, bytes]]:
        """``(stream, bytes)``, 1 for stdout and 2 for stderr, until the command ends; then
        ``result`` holds how."""
        try:
            async for message in self._socket:
                if isinstance(message, str) or not message:
                    continue
                channel, data = message[0], message[1:]
                if channel == exec_protocol.EXIT:
                    self.result = _result(data)
                    return
                yield channel, bytes(data)
        except ConnectionClosed:
            pass
        if self.result is None:
            raise ServerUnreachable("the server closed the session before the command ended")

    async def close(self) -> None:
        await self._socket.close()

    async def _send(self, channel: int, data: bytes) -> None:
        with contextlib.suppress(ConnectionClosed):  # the command ended: its result follows
            await self._socket.send(bytes([channel]) + data)


@dataclass(frozen=True)
class Completed:
    """A command run to its end: its output and how it ended."""

    stdout: bytes
    stderr: bytes
    result: ExecResult


async def run(
    url: str, headers: Mapping[str, str], vm_id: str, request: ExecRequest, stdin: bytes = b""
) -> Completed:
    """Run ``request`` with ``stdin`` and collect its output. An error before the command
    starts raises ``APIError``; one after (it cannot run, the VM stopped) is in
    ``result.error``."""
    session = await ExecSession.open(url, headers, vm_id, request)
    outputs: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
    try:
        if stdin:
            await session.write(stdin)
        await session.write(b"")
        async for stream, data in session.output():
            outputs[stream] += data
    finally:
        await session.close()
    assert session.result is not None
    return Completed(bytes(outputs[1]), bytes(outputs[2]), session.result)


def _result(data: bytes) -> ExecResult:
    try:
        return ExecResult.model_validate_json(data)
    except ValidationError:
        return ExecResult(error={"code": "http-error", "message": "an unreadable exec result"})


async def open_websocket(url: str, headers: Mapping[str, str], path: str) -> ClientConnection:
    """A WebSocket to ``path`` of the API at ``url``; a refusal raises ``APIError`` as any
    call's does (the VM is not found, has no helper...), no answer ``ServerUnreachable``."""
    try:
        return await connect(
            websocket_url(url, path), additional_headers=dict(headers), compression=None,
            max_size=None, open_timeout=OPEN_TIMEOUT, proxy=None,
        )  # fmt: skip
    except InvalidStatus as exc:
        raise error_of(exc.response.status_code, bytes(exc.response.body or b"")) from None
    except (OSError, TimeoutError, WebSocketException) as exc:
        raise ServerUnreachable(f"cannot reach {url}: {exc}") from exc


def websocket_url(base: str, path: str) -> str:
    parts = urlsplit(base)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + path, "", ""))
