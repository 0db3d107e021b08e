"""Requests about a VM that another host of the fleet runs (exec, ports, files, console),
passed on to that host's API as the caller, signed with the fleet's secret (``relay_auth``),
and its answer passed back as it comes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
from fastapi import Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from goldclone import relay_auth
from goldclone.access import Principal
from goldclone.api.guards import refuse
from goldclone.client.exec import websocket_url
from goldclone.errors import ExecUnavailable
from goldclone.service import VMService

OPEN_TIMEOUT = 30.0
_PASSED_ON = ("content-type", "www-authenticate", "retry-after")


class Relay:
    """This host's way to the others: it relays only when it has the fleet's secret, and
    never a request that another host relayed here (no loops)."""

    def __init__(self, service: VMService, secret: str | None) -> None:
        self._service = service
        self._secret = secret
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(OPEN_TIMEOUT, read=None))

    async def target(self, who: Principal, vm_id: str, path: str) -> str | None:
        """The URL of ``path`` (``{id}`` standing for the VM's ID) on the host that runs
        the VM, when this host relays there; ``None``: this host answers itself."""
        if self._secret is None or who.relayed:
            return None
        found = await self._service.elsewhere(vm_id, who.tenant_seen)
        return None if found is None else found[1] + path.format(id=found[0])

    def _headers(self, who: Principal) -> dict[str, str]:
        assert self._secret is not None
        return relay_auth.sign(self._secret, who, self._service.fleet.host_id)

    async def websocket(self, websocket: WebSocket, url: str, who: Principal) -> None:
        """Open ``url`` as ``who``; refuse ``websocket`` as that host refused, or accept it and
        carry every message both ways until either side closes (with its code and reason)."""
        try:
            upstream = await connect(
                websocket_url(url, ""), additional_headers=self._headers(who),
                compression=None, max_size=None, open_timeout=OPEN_TIMEOUT, proxy=None,
            )  # fmt: skip
        except InvalidStatus as refused:
            answer = Response(refused.response.body or b"", refused.response.status_code,
                              media_type="application/json")  # fmt: skip
            await answer(websocket.scope, websocket.receive, websocket.send)
            return
        except (OSError, TimeoutError, WebSocketException) as exc:
            error = ExecUnavailable(f"the VM's host cannot be reached at {url}: {exc}")
            await refuse(websocket.scope, websocket.receive, websocket.send, error)
            return
        await websocket.accept()
        await _carry(websocket, upstream)

    async def http(self, request: Request, url: str, who: Principal) -> Response:
        """``request`` made to ``url`` as ``who``, its body and its answer streamed."""
        headers = self._headers(who)
        if "content-type" in request.headers:
            headers["Content-Type"] = request.headers["content-type"]
        sent = self._http.build_request(
            request.method, url, params=request.query_params, headers=headers,
            content=request.stream() if request.method in ("PUT", "POST") else None,
        )  # fmt: skip
        try:
            answer = await self._http.send(sent, stream=True)
        except httpx.TransportError as exc:
            raise ExecUnavailable(f"the VM's host cannot be reached at {url}: {exc}") from exc
        kept = {name: value for name, value in answer.headers.items() if name in _PASSED_ON}
        return StreamingResponse(_body(answer), answer.status_code, headers=kept)

    async def close(self) -> None:
        await self._http.aclose()


async def _body(answer: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in answer.aiter_raw():
            yield chunk
    finally:
        await answer.aclose()


async def _carry(websocket: WebSocket, upstream: ClientConnection) -> None:
    async def downstream() -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in upstream:
                if isinstance(message, bytes):
                    await websocket.send_bytes(message)
                else:
                    await websocket.send_text(message)

    async def up() -> None:
        while (message := await websocket.receive())["type"] != "websocket.disconnect":
            if (data := message.get("bytes")) is not None:
                await upstream.send(data)
            elif (text := message.get("text")) is not None:
                await upstream.send(text)

    tasks = [asyncio.create_task(downstream()), asyncio.create_task(up())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await upstream.close()
    code, reason = upstream.close_code or 1000, upstream.close_reason or ""
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
        await websocket.close(code if code != 1005 else 1000, reason)
