"""The API's WebSocket routes: ``GET /vms/{id}/exec`` (``exec_protocol``). Every refusal
before the socket is accepted is an HTTP answer, as any route's; after it, an ``EXIT`` frame
with the error."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from goldclone import exec_protocol
from goldclone.access import Principal, Role
from goldclone.api.guards import refuse
from goldclone.api.relay import Relay
from goldclone.api.tunnels import tunnel
from goldclone.errors import CannotRun, ExecFailed, Forbidden, GoldcloneError, InvalidRequest
from goldclone.exec_protocol import ExecRequest, ExecResult, TerminalSize
from goldclone.guest.channel import Channel, Exit, Session
from goldclone.problems import explain_errors
from goldclone.service import VMService

log = logging.getLogger(__name__)


def add_socket_routes(app: FastAPI, service: VMService, relay: Relay) -> None:
    async def accepted(websocket: WebSocket, vm_id: str, path: str) -> Channel | None:
        """The VM's helper channel, once the socket is accepted; ``None`` when it was
        refused instead, before it opened (the token, the VM, its helper), or relayed to
        the VM's own host (``path``: this route's, ``{id}`` standing for the VM's ID)."""
        who: Principal = websocket.state.principal
        try:
            if not who.may(Role.USER):
                raise Forbidden(f"token {who.name} ({who.role} role) may not reach guests")
            if (url := await relay.target(who, vm_id, path)) is not None:
                await relay.websocket(websocket, url, who)
                return None
            channel = await service.channel(vm_id, who.tenant_seen)
        except GoldcloneError as error:
            await refuse(websocket.scope, websocket.receive, websocket.send, error)
            return None
        await websocket.accept()
        return channel

    @app.websocket("/vms/{vm_id}/ports/{port}")
    async def forward_port(websocket: WebSocket, vm_id: str, port: str) -> None:
        if not port.isdigit() or not 0 < int(port) < 65536:
            error = InvalidRequest(f"port: {port[:16]!r} is not a port (1-65535)")
            await refuse(websocket.scope, websocket.receive, websocket.send, error)
            return
        if (channel := await accepted(websocket, vm_id, f"/vms/{{id}}/ports/{port}")) is None:
            return
        await tunnel(websocket, channel, int(port))

    @app.websocket("/vms/{vm_id}/exec")
    async def exec_in_guest(websocket: WebSocket, vm_id: str) -> None:
        if (channel := await accepted(websocket, vm_id, "/vms/{id}/exec")) is None:
            return
        try:
            request = ExecRequest.model_validate_json(await websocket.receive_text())
        except WebSocketDisconnect:
            return
        except (ValidationError, KeyError) as exc:
            why = explain_errors(exc.errors()) if isinstance(exc, ValidationError) else "no JSON"
            await _end(websocket, _failed(InvalidRequest(f"the exec request: {why}")), 1008)
            return
        started = time.monotonic()
        try:
            session = await channel.session(_open_frame(request))
            result = await _run_session(websocket, session, request.timeout)
        except (ExecFailed, InvalidRequest) as exc:
            result = _failed(exc)
        if result is None:
            return  # the client went away; the helper killed what ran
        took = time.monotonic() - started
        late = " (timed out)" if result.timed_out else ""
        log.info("exec in VM %s ended: exit %s%s, %.1f s", vm_id, result.exit_code, late, took)
        await _end(websocket, result, 1000 if result.error is None else 1011)


def _open_frame(request: ExecRequest) -> dict[str, object]:
    """The helper's ``OPEN`` for ``request``; the timeout is kept here."""
    tty = request.tty.model_dump() if request.tty is not None else None
    return {"argv": request.command(), "env": request.env, "cwd": request.cwd, "tty": tty}


async def _run_session(
    websocket: WebSocket, session: Session, timeout: float | None
) -> ExecResult | None:
    """Carry the session's output to the client and the client's input to the session until
    the command ends (its result) or the client goes (``None``; the session is closed)."""
    outputs = asyncio.create_task(_outputs(websocket, session))
    inputs = asyncio.create_task(_inputs(websocket, session))
    timed_out = False
    try:
        both = {outputs, inputs}
        done, _ = await asyncio.wait(both, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            timed_out = True
            await session.signal(signal.SIGKILL)
            done, _ = await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
        finished = outputs if outputs in done else inputs
        if isinstance(finished.exception(), _GONE):
            return None
        ended = outputs.result() if finished is outputs else inputs.result()
    finally:
        for task in (outputs, inputs):
            task.cancel()
        await asyncio.gather(outputs, inputs, return_exceptions=True)
        await session.close()
    if ended is None:
        return None  # the client went away
    if ended.error is not None:
        error = CannotRun(ended.error)
        return ExecResult(exit_code=ended.exit_code, error=error.as_dict())
    return ExecResult(exit_code=ended.exit_code, signal=ended.signal, timed_out=timed_out)


_GONE = (WebSocketDisconnect, OSError)
"""What sending to or reading from a client that went away raises."""


async def _outputs(websocket: WebSocket, session: Session) -> Exit:
    while True:
        item = await session.receive()
        if isinstance(item, Exit):
            return item
        await websocket.send_bytes(bytes([item.stream]) + item.data)
        await session.consumed(len(item.data))


async def _inputs(websocket: WebSocket, session: Session) -> None:
    """The client's frames until it goes; raises ``InvalidRequest`` for a frame it may not
    send."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("bytes") or b""
        if not data:
            raise InvalidRequest("a frame with no channel byte, or text, after the request")
        if data[0] == exec_protocol.STDIN:
            await (session.write(data[1:]) if len(data) > 1 else session.end_input())
        elif data[0] == exec_protocol.RESIZE:
            try:
                size = TerminalSize.model_validate_json(data[1:])
            except ValidationError as exc:
                raise InvalidRequest(f"a resize frame: {explain_errors(exc.errors())}") from None
            await session.resize(size.rows, size.cols)
        else:
            raise InvalidRequest(f"a frame on channel {data[0]}, which a client may not send")


def _failed(error: GoldcloneError) -> ExecResult:
    return ExecResult(error={"code": error.code, "message": error.message})


async def _end(websocket: WebSocket, result: ExecResult, code: int) -> None:
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        message = result.model_dump_json(exclude_none=True).encode()
        await websocket.send_bytes(bytes([exec_protocol.EXIT]) + message)
        await websocket.close(code)
