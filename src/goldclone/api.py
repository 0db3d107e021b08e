"""The HTTP layer. It parses requests, calls the service and maps errors; nothing more."""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from goldclone.config import Limits
from goldclone.errors import GoldcloneError
from goldclone.models import VM, CreateVMRequest, ErrorBody, Image, ImageList, ImageSpec, VMList
from goldclone.service import VMService

log = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "invalid-json or invalid-request",
        401: "unauthorized",
        404: "vm-not-found or image-not-found",
        409: "vm-conflict, image-in-use, capacity-exceeded or idempotency-conflict",
        413: "body-too-large",
        415: "unsupported-media-type",
        500: "internal-error",
    }.items()
}


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status)


def create_app(
    service: VMService,
    max_body_bytes: int = 64 * 1024,
    tokens: tuple[str, ...] = (),
    limits: Limits | None = None,
) -> FastAPI:
    """The goldclone API over ``service``, which it starts and closes with the server.

    With ``tokens``, every endpoint but ``/healthz`` needs ``Authorization: Bearer TOKEN``.
    ``limits`` bound ``cpus`` and ``memory`` in the OpenAPI description as they do in requests.
    """

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.close()

    app = FastAPI(
        lifespan=lifespan,
        title="goldclone",
        version="1",
        summary="Disposable linked-clone VMs from verified gold images.",
        responses=_ERRORS,
    )

    @app.get("/healthz", operation_id="healthz")
    async def healthz() -> dict[str, str]:
        """Whether the server is up; needs no token."""
        return {"status": "ok"}

    @app.post("/vms", status_code=202, response_model=VM, operation_id="create_vm",
              responses={202: {"links": _VM_LINKS}})  # fmt: skip
    async def create_vm(
        body: CreateVMRequest,
        idempotency_key: Annotated[
            str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)
        ] = None,
    ) -> VM:
        """Accept a VM for creation; the work goes on in the background.

        With an ``Idempotency-Key``, a repeat of the same request returns the same VM.
        """
        return await service.create(body, idempotency_key)

    @app.get("/vms", response_model=VMList, operation_id="list_vms")
    async def list_vms() -> VMList:
        return VMList(vms=await service.list_vms())

    @app.get("/vms/{vm_id}", response_model=VM, operation_id="get_vm")
    async def get_vm(vm_id: str) -> VM:
        return await service.get(vm_id)

    @app.delete("/vms/{vm_id}", status_code=204, response_class=Response, operation_id="delete_vm")
    async def delete_vm(vm_id: str) -> Response:
        """Stop the VM and remove its clone and everything it had."""
        await service.delete(vm_id)
        return Response(status_code=204)

    @app.get("/images", response_model=ImageList, operation_id="list_images")
    async def list_images() -> ImageList:
        """Gold images on disk, being fetched, or whose last fetch failed."""
        return ImageList(images=await service.images())

    @app.post("/images", status_code=202, response_model=Image, operation_id="pull_image",
              responses={202: {"links": _IMAGE_LINKS}})  # fmt: skip
    async def prefetch_image(body: ImageSpec) -> Image:
        """Fetch an image ahead of time, so that the first VM does not wait for it."""
        return service.prefetch(body)

    @app.delete("/images/{image_id}", status_code=204, response_class=Response,
                operation_id="delete_image")  # fmt: skip
    async def delete_image(image_id: str) -> Response:
        """Remove a gold image; 409 ``image-in-use`` while any VM uses it."""
        await service.delete_image(image_id)
        return Response(status_code=204)

    @app.exception_handler(GoldcloneError)
    async def _goldclone_error(_: Request, exc: GoldcloneError) -> JSONResponse:
        if exc.status >= 500:
            log.error("request failed: %s", exc.message)
            return _error(500, "internal-error", "an internal error; see the server log")
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _error(400, "invalid-json", "the body is not valid JSON")
        return _error(400, "invalid-request", _describe(errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not-found", 405: "method-not-allowed"}
        response = _error(
            exc.status_code, codes.get(exc.status_code, "http-error"), str(exc.detail)
        )
        if exc.status_code == 405:
            response.headers["Allow"] = ", ".join(_methods_of(app, request))
        return response

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("request failed unexpectedly", exc_info=exc)
        return _error(500, "internal-error", "an internal error; see the server log")

    _describe_host(app, service, limits)
    posts = {r.path for r in app.routes if isinstance(r, APIRoute) and "POST" in (r.methods or ())}
    app.add_middleware(BodyGuard, max_body_bytes=max_body_bytes, paths=posts)
    if tokens:
        app.add_middleware(BearerGuard, tokens=tokens)  # outermost: before any body is read
    return app


_VM_LINKS = {
    name: {"operationId": operation, "parameters": {"vm_id": "$response.body#/id"}}
    for name, operation in (("GetVM", "get_vm"), ("DeleteVM", "delete_vm"))
}
_IMAGE_LINKS = {
    "DeleteImage": {"operationId": "delete_image",
                    "parameters": {"image_id": "$response.body#/id"}},
}  # fmt: skip


def _methods_of(app: FastAPI, request: Request) -> list[str]:
    """Every method that some route serves at the request's path (each route has one)."""
    methods: set[str] = set()
    for route in app.routes:
        if isinstance(route, APIRoute) and route.matches(request.scope)[0] is not Match.NONE:
            methods |= route.methods or set()
    return sorted(methods)


def _describe_host(app: FastAPI, service: VMService, limits: Limits | None) -> None:
    """Put what this host accepts into the OpenAPI description: its bounds on ``cpus`` and
    ``memory``, and the network types it offers."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()
        fields = schema["components"]["schemas"]["CreateVMRequest"]["properties"]
        if limits is not None:
            fields["cpus"] |= {"minimum": limits.min_cpus, "maximum": limits.max_cpus}
            fields["memory"] |= {"minimum": limits.min_memory_mb, "maximum": limits.max_memory_mb}
        fields["network_type"]["enum"] = service.network_types()
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _describe(errors: Any) -> str:
    """One line naming each offending field, e.g. ``image.checksum: must be hexadecimal``."""
    parts = []
    for error in errors:
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        field = ".".join(loc) or "body"
        kind = error.get("type", "")
        if kind == "extra_forbidden":
            message = "unknown field"
        elif kind == "missing":
            message = "is required"
        else:
            message = str(error.get("msg", "is invalid")).removeprefix("Value error, ")
        parts.append(f"{field}: {message}")
    return "; ".join(parts)


class BearerGuard:
    """Answers 401 unless the request carries one of the tokens as a bearer token.

    Every configured token is compared, in constant time, so the answer's timing tells nothing
    about which token came close. Tokens are never logged.
    """

    def __init__(self, app: ASGIApp, tokens: tuple[str, ...]) -> None:
        self._app = app
        self._tokens = [token.encode() for token in tokens]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/healthz" or self._allowed(scope):
            await self._app(scope, receive, send)
            return
        response = _error(401, "unauthorized", "a valid bearer token is required")
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        presented = b""
        for name, value in scope["headers"]:
            if name.lower() == b"authorization" and value[:7].lower() == b"bearer ":
                presented = value[7:].strip()
        matches = [hmac.compare_digest(presented, token) for token in self._tokens]
        return any(matches)


class BodyGuard:
    """Refuses bodies that are too large (413) or not JSON (415) before any parsing.

    It reads the body up to the limit itself and hands it on, so a chunked upload without
    ``Content-Length`` is bounded too.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, paths: set[str]) -> None:
        self._app = app
        self._max = max_body_bytes
        self._paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self._paths:
            await self._app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max:
            await self._refuse(scope, receive, send, 413)
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
                await self._refuse(scope, receive, send, 413)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            await self._refuse(scope, receive, send, 415)
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
        if status == 413:
            response = _error(413, "body-too-large", f"the body is over {self._max} bytes")
        else:
            response = _error(
                415, "unsupported-media-type", "the body must be sent as application/json"
            )
        await response(scope, receive, send)
