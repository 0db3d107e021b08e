"""Guards that answer before a request reaches a route: bearer tokens, and the body's size and
media type."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from goldclone import relay_auth
from goldclone.access import ANONYMOUS, Access, Principal, Role
from goldclone.errors import (
    BodyTooLarge,
    Forbidden,
    GoldcloneError,
    Unauthorized,
    UnsupportedMediaType,
)

log = logging.getLogger("goldclone.http")


def error_response(error: GoldcloneError) -> JSONResponse:
    """The API's answer for ``error``: its status, and ``{"code", "message"}``; with
    ``Retry-After`` when the error says when to ask again."""
    response = JSONResponse(error.as_dict(), status_code=error.status)
    if (wait := getattr(error, "retry_after", None)) is not None:
        response.headers["Retry-After"] = str(wait)
    return response


class BearerGuard:
    """Answers 401 unless the request carries a known bearer token (``access``), and tells the
    routes who the request comes from (``scope["state"]["principal"]``). With no token
    configured, every request is ``ANONYMOUS``. Tokens are never logged. A WebSocket is
    guarded as a request is: refused before it is accepted, with the same JSON answer where
    the server can send one (ASGI's ``websocket.http.response``), else closed with 1008."""

    def __init__(self, app: ASGIApp, access: Access, fleet_secret: str | None = None) -> None:
        self._app = app
        self._access = access
        self._fleet_secret = fleet_secret

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] == "/healthz":
            await self._app(scope, receive, send)
            return
        error: GoldcloneError = Unauthorized()
        try:
            principal = self._principal(scope)
        except relay_auth.RelayRefused as refused:
            principal, error = None, Unauthorized(str(refused))
        if principal is not None and (principal.may(Role.READ) or scope["path"] == "/metrics"):
            scope.setdefault("state", {})["principal"] = principal
            await self._app(scope, receive, send)
            return
        if principal is not None:
            error = Forbidden(
                f"token {principal.name} ({principal.role} role) is good for GET /metrics only"
            )
        await refuse(scope, receive, send, error)

    def _principal(self, scope: Scope) -> Principal | None:
        """Who the request comes from: the caller a relayed request carries (when it is
        relayed by another host of the fleet, and verifies), the bearer token's, or nobody."""
        headers = Headers(scope=scope)
        if relay_auth.HEADER in headers:
            if self._fleet_secret is None:
                raise relay_auth.RelayRefused("a relayed request, and this host takes none")
            return relay_auth.verify(self._fleet_secret, headers)
        return ANONYMOUS if self._access.open else self._access.principal(_bearer(scope))


async def refuse(scope: Scope, receive: Receive, send: Send, error: GoldcloneError) -> None:
    """Answer a request, or a WebSocket before it is accepted, with ``error``; a WebSocket
    whose server cannot send an HTTP answer (ASGI's ``websocket.http.response``) is closed
    with 1008 and the error's code."""
    if scope["type"] == "websocket" and _DENIAL not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008, "reason": error.code})
        return
    response = error_response(error)
    if isinstance(error, Unauthorized):
        response.headers["WWW-Authenticate"] = "Bearer"
    await response(scope, receive, send)


_DENIAL = "websocket.http.response"


def _bearer(scope: Scope) -> bytes:
    """The request's bearer token; empty without one."""
    presented = b""
    for name, value in scope["headers"]:
        if name.lower() == b"authorization" and value[:7].lower() == b"bearer ":
            presented = value[7:].strip()
    return presented


class RequestLog:
    """Counts each HTTP request by method, route (the path template, such as
    ``/vms/{vm_id}``, so that IDs make no series of their own) and status, and logs it: reads
    at DEBUG (a client that polls would fill the log), changes at INFO, server errors at
    WARNING. The query string is not logged."""

    def __init__(self, app: ASGIApp, count: Callable[[str, str, int], None]) -> None:
        self._app = app
        self._count = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        status, started = 500, time.monotonic()

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, sending)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            self._count(method, template, status)
            level = logging.DEBUG if method in ("GET", "HEAD") else logging.INFO
            log.log(logging.WARNING if status >= 500 else level, "%s %s %d %.1f ms", method,
                    scope["path"], status, (time.monotonic() - started) * 1000)  # fmt: skip


class BodyGuard:
    """Refuses bodies that are too large (413) or not JSON (415) before any parsing, for the
    requests that ``takes_body`` says are for an endpoint that reads one.

    It reads the body up to the limit itself and hands it on, so a chunked upload without
    ``Content-Length`` is bounded too.
    """

    def __init__(
        self, app: ASGIApp, max_body_bytes: int, takes_body: Callable[[Scope], bool]
    ) -> None:
        self._app = app
        self._max = max_body_bytes
        self._takes_body = takes_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._takes_body(scope):
            await self._app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max:
            await self._refuse(scope, receive, send, BodyTooLarge.status)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max:
                await self._refuse(scope, receive, send, BodyTooLarge.status)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            await self._refuse(scope, receive, send, UnsupportedMediaType.status)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self._app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int) -> None:
        if status == BodyTooLarge.status:
            error: GoldcloneError = BodyTooLarge(f"the body is over {self._max} bytes")
        else:
            error = UnsupportedMediaType("the body must be sent as application/json")
        await error_response(error)(scope, receive, send)
