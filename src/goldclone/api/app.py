"""The HTTP layer. It parses requests, calls the service and maps errors; nothing more."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from json import JSONDecodeError
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Scope

from goldclone.access import Access, Principal, Role
from goldclone.api.guards import BearerGuard, BodyGuard, RequestLog, error_response
from goldclone.api.openapi import (
    ERRORS,
    EVENT_STREAM,
    HOST_LINKS,
    IMAGE_LINKS,
    POOL_LINKS,
    TAR,
    TAR_TYPE,
    TEXT,
    VM_LINKS,
    describe_host,
)
from goldclone.api.relay import Relay
from goldclone.api.sockets import add_socket_routes
from goldclone.errors import (
    Forbidden,
    GoldcloneError,
    InvalidJSON,
    InvalidRequest,
    MethodNotAllowed,
    RouteNotFound,
    UnsupportedMediaType,
)
from goldclone.image_spec import ImageSpec
from goldclone.labels import parse_selectors
from goldclone.models import (
    MAX_WAIT,
    VM,
    CreateVMRequest,
    HostList,
    Image,
    ImageBuild,
    ImageChange,
    ImageList,
    ImagePush,
    Pool,
    PoolList,
    PoolRequest,
    Pushed,
    Readiness,
    Status,
    Template,
    TemplateList,
    TemplateRequest,
    UpdateVMRequest,
    VMList,
)
from goldclone.problems import explain_errors, explain_json_error
from goldclone.service import VMService, guest_files
from goldclone.service.events import VMFilter
from goldclone.service.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from goldclone.settings import Limits
from goldclone.store.event_log import Event

log = logging.getLogger(__name__)

_INTERNAL = GoldcloneError("an internal error; see the server log")


def create_app(
    service: VMService,
    max_body_bytes: int = 64 * 1024,
    access: Access | None = None,
    limits: Limits | None = None,
    fleet_secret: str | None = None,
) -> FastAPI:
    """The goldclone API over ``service``, which it starts and closes with the server.

    With tokens in ``access``, every endpoint but ``/healthz`` needs ``Authorization: Bearer
    TOKEN``, and each route what its role may do (``access.Role``). ``limits`` bound ``cpus``
    and ``memory`` in the OpenAPI description as they do in requests.
    With ``fleet_secret``, requests about another host's VMs are relayed to it (``relay``),
    and those other hosts relay here are taken."""
    relay = Relay(service, fleet_secret)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await relay.close()
            await service.close()

    app = FastAPI(
        lifespan=lifespan,
        title="goldclone",
        version="1",
        summary="Disposable linked-clone VMs from verified gold images.",
        responses=ERRORS,
    )

    @app.get("/healthz", operation_id="healthz")
    async def healthz() -> dict[str, str]:
        """Whether the server is up; needs no token."""
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response, operation_id="metrics",
             responses={200: TEXT}, dependencies=[_needs(Role.METRICS)])  # fmt: skip
    async def metrics() -> Response:
        """Prometheus metrics in its text format; with a ``metrics``, ``operator`` or
        ``admin`` token."""
        return Response(await service.metrics_text(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/readyz", response_model=Readiness, operation_id="readyz",
             responses={503: {"model": Readiness, "description": "a part is failing"}})  # fmt: skip
    async def readyz() -> JSONResponse:
        """Whether the store, the driver and each network this service owns work now; 503,
        with the reason of each part that fails, when one does."""
        readiness = await service.readiness()
        status = 200 if readiness.status == "ok" else 503
        return JSONResponse(readiness.model_dump(mode="json"), status_code=status)

    @app.post("/vms", status_code=202, response_model=VM, operation_id="create_vm",
              responses={202: {"links": VM_LINKS}}, dependencies=[_needs(Role.USER)])  # fmt: skip
    async def create_vm(
        body: CreateVMRequest,
        who: _Who,
        idempotency_key: Annotated[
            str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)
        ] = None,
    ) -> VM:
        """Accept a VM for creation, for the token's tenant; the work goes on in the
        background.

        With an ``Idempotency-Key``, a repeat of the same request returns the same VM.
        """
        return await service.create(body, idempotency_key, who.tenant)

    @app.get("/vms", response_model=VMList, operation_id="list_vms")
    async def list_vms(who: _Who, label: _Labels = (), status: _Statuses = ()) -> VMList:
        """Every VM of the token's tenant (every tenant's, for ``admin``), oldest first; or
        those with every ``label=KEY=VALUE`` given and one of the ``status`` values given."""
        return VMList(vms=await service.list_vms(_filter(who, label, status)))

    @app.get("/vms/{vm_id}", response_model=VM, operation_id="get_vm")
    async def get_vm(
        vm_id: _VMRef,
        who: _Who,
        wait: bool = False,
        timeout: Annotated[float, Query(ge=0, le=MAX_WAIT)] = DEFAULT_WAIT,
    ) -> VM:
        """The VM. With ``wait=true``, the answer comes as soon as the VM is no longer
        ``creating``, or after ``timeout`` seconds with the VM as it is then."""
        return await service.get(vm_id, timeout if wait else 0.0, who.tenant_seen)

    @app.patch("/vms/{vm_id}", response_model=VM, operation_id="update_vm",
               dependencies=[_needs(Role.USER)])  # fmt: skip
    async def update_vm(vm_id: _VMRef, body: UpdateVMRequest, who: _Who) -> VM:
        """Renew the VM's lease (``ttl``: it ends that many seconds from now) or replace its
        ``labels``; 409 once the VM is being deleted."""
        return await service.update(vm_id, body, who.tenant_seen)

    @app.get("/events", response_class=StreamingResponse, operation_id="events",
             responses={200: EVENT_STREAM})  # fmt: skip
    async def events(
        who: _Who,
        label: _Labels = (),
        status: _Statuses = (),
        last_event_id: Annotated[int | None, Header(alias="Last-Event-ID", ge=0)] = None,
    ) -> StreamingResponse:
        """Server-Sent Events: one per change of a VM (``vm``, ``vm.deleted``), an image
        (``image``, ``image.deleted``) or a pool (``pool``, ``pool.deleted``), its ``data``
        the object as the change left it. With ``Last-Event-ID``, the events after that one
        come first (``dropped`` says that some of them are no longer kept); without it, the
        stream starts now. ``label`` and ``status`` keep only the VMs' events that match; a
        VM's events come only to its tenant's tokens (and ``admin`` ones)."""
        wanted = _filter(who, label, status)
        stream = service.events(last_event_id, wanted)
        return StreamingResponse(_server_sent(stream), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})  # fmt: skip

    @app.get("/vms/{vm_id}/console", response_class=StreamingResponse,
             operation_id="get_console", responses={200: TEXT})  # fmt: skip
    async def get_console(
        vm_id: _VMRef, who: _Who, request: Request, follow: bool = False
    ) -> Response:
        """The guest's serial console so far (its last MiB), as text; with ``follow``, what it
        writes next is streamed until the VM is gone."""
        if (url := await relay.target(who, vm_id, "/vms/{id}/console")) is not None:
            return await relay.http(request, url, who)
        lines = await service.console(vm_id, follow, who.tenant_seen)
        return StreamingResponse(lines, media_type="text/plain; charset=utf-8")

    @app.get("/vms/{vm_id}/files", response_class=StreamingResponse, operation_id="get_files",
             responses={200: TAR}, dependencies=[_needs(Role.USER)])  # fmt: skip
    async def get_files(vm_id: _VMRef, who: _Who, path: _GuestPath, request: Request) -> Response:
        """A tar of the guest's file or folder at ``path``, modes kept, its one top member
        named as the path's last part (**404** ``path-not-found``)."""
        if (url := await relay.target(who, vm_id, "/vms/{id}/files")) is not None:
            return await relay.http(request, url, who)
        channel = await service.channel(vm_id, who.tenant_seen)
        tar = await guest_files.read_tree(channel, path)
        return StreamingResponse(tar, media_type=TAR_TYPE)

    @app.put("/vms/{vm_id}/files", status_code=204, response_class=Response,
             operation_id="put_files", openapi_extra={"requestBody": {**TAR, "required": True}},
             dependencies=[_needs(Role.USER)])  # fmt: skip
    async def put_files(vm_id: _VMRef, who: _Who, path: _GuestPath, request: Request) -> Response:
        """Extract the tar in the body (``application/x-tar``, streamed) into the guest's
        folder ``path``, which must exist; modes kept."""
        if request.headers.get("content-type", "").split(";")[0].strip() != TAR_TYPE:
            raise UnsupportedMediaType(f"the body must be a tar sent as {TAR_TYPE}")
        if (url := await relay.target(who, vm_id, "/vms/{id}/files")) is not None:
            return await relay.http(request, url, who)
        channel = await service.channel(vm_id, who.tenant_seen)
        await guest_files.write_tree(channel, path, request.stream())
        return Response(status_code=204)

    @app.delete("/vms/{vm_id}", status_code=204, response_class=Response, operation_id="delete_vm",
                dependencies=[_needs(Role.USER)])  # fmt: skip
    async def delete_vm(vm_id: _VMRef, who: _Who) -> Response:
        """Stop the VM and remove its clone and everything it had."""
        await service.delete(vm_id, who.tenant_seen)
        return Response(status_code=204)

    @app.get("/images", response_model=ImageList, operation_id="list_images")
    async def list_images(who: _Who) -> ImageList:
        """Gold images on disk, being fetched, or whose last fetch failed, that the token's
        tenant has shown it has, or that are public (every one, for ``admin``)."""
        return ImageList(images=await service.catalog.images(who.tenant_seen))

    @app.post("/images", status_code=202, response_model=Image, operation_id="pull_image",
              responses={202: {"links": IMAGE_LINKS}},
              dependencies=[_needs(Role.OPERATOR)])  # fmt: skip
    async def prefetch_image(body: ImageSpec, who: _Who) -> Image:
        """Fetch an image ahead of time, so that the first VM does not wait for it. An image
        in the cache already is checked against the URL (a download) before it is the
        token's tenant's."""
        return await service.catalog.prefetch(body, who.tenant)

    @app.get("/images/{image_id}", response_model=Image, operation_id="get_image")
    async def get_image(image_id: str, who: _Who) -> Image:
        """One gold image, by any of its IDs, as ``GET /images`` lists it."""
        return await service.catalog.image(image_id, who.tenant_seen)

    @app.get("/images/{image_id}/templates", response_model=TemplateList,
             operation_id="list_templates")  # fmt: skip
    async def list_templates(image_id: str, who: _Who) -> TemplateList:
        """The image's memory templates on this host."""
        image = await service.catalog.image(image_id, who.tenant_seen)
        return TemplateList(templates=image.templates)

    @app.post("/vms/{vm_id}/image", status_code=201, response_model=Image,
              operation_id="make_image", dependencies=[_needs(Role.USER)])  # fmt: skip
    async def make_image(vm_id: _VMRef, body: ImageBuild, who: _Who, request: Request) -> Response:
        """Stop the VM (it stays ``stopped``) and make its disk a gold image of the token's
        tenant; with ``push`` (``operator``), push it there first. 201 with the image."""
        if body.push is not None and not who.may(Role.OPERATOR):
            raise Forbidden(f"token {who.name} ({who.role} role) may not push: it needs operator")
        if (url := await relay.target(who, vm_id, "/vms/{id}/image")) is not None:
            return await relay.http(request, url, who)
        image = await service.make_image(vm_id, body, who.tenant_seen, who.tenant)
        return JSONResponse(image.model_dump(mode="json"), status_code=201)

    @app.post("/images/{image_id}/push", response_model=Pushed, operation_id="push_image",
              dependencies=[_needs(Role.OPERATOR)])  # fmt: skip
    async def push_image(image_id: str, body: ImagePush, who: _Who) -> Pushed:
        """Push a ready gold image to a registry reference with a tag, as a disk artifact."""
        return await service.builder.push(image_id, body.oci, body.chunk_mb, who.tenant_seen)

    @app.delete("/images/{image_id}/templates/{template_id}", status_code=204,
                response_class=Response, operation_id="delete_template",
                dependencies=[_needs(Role.OPERATOR)])  # fmt: skip
    async def delete_template(image_id: str, template_id: str) -> Response:
        """Remove a memory template (also one being made, or one that failed, to make it
        again); 409 ``template-in-use`` while VMs restored from it, or a warm pool of its
        image and shape, exist."""
        await service.catalog.delete_template(image_id, template_id)
        return Response(status_code=204)

    @app.patch("/images/{image_id}", response_model=Image, operation_id="update_image",
               dependencies=[_needs(Role.OPERATOR)])  # fmt: skip
    async def update_image(image_id: str, body: ImageChange) -> Image:
        """Make a ready image every tenant's (``public: true``), or only theirs that showed
        they have it by its URL."""
        return await service.catalog.set_public(image_id, body.public)

    @app.post("/images/{image_id}/templates", status_code=202, response_model=Template,
              operation_id="create_template", dependencies=[_needs(Role.OPERATOR)])  # fmt: skip
    async def create_template(image_id: str, body: TemplateRequest) -> Template:
        """Make a memory template of a ready gold image for one shape (``cpus``, ``memory``):
        VMs of that image and shape then start from it in about a second. A template of that
        image and shape that exists already is the answer."""
        return await service.templates.create(image_id, body)

    @app.delete("/images/{image_id}", status_code=204, response_class=Response,
                operation_id="delete_image", dependencies=[_needs(Role.OPERATOR)])  # fmt: skip
    async def delete_image(image_id: str) -> Response:
        """Remove a gold image; 409 ``image-in-use`` while any VM or warm pool uses it."""
        await service.catalog.delete(image_id)
        return Response(status_code=204)

    @app.get("/pools", response_model=PoolList, operation_id="list_pools")
    async def list_pools() -> PoolList:
        """The warm pools, with how many VMs each has ready and being restored."""
        return PoolList(pools=await service.pools.all())

    @app.put("/pools/{name}", response_model=Pool, operation_id="put_pool",
             dependencies=[_needs(Role.OPERATOR)],
             responses={200: {"links": POOL_LINKS},
                        201: {"model": Pool, "description": "The pool was made.",
                              "links": POOL_LINKS}})  # fmt: skip
    async def put_pool(name: str, body: PoolRequest, response: Response) -> Pool:
        """Make a warm pool, or change one: ``size`` VMs of the image and shape, restored from
        its memory template (made if need be) and kept running, for ``POST /vms`` of that
        image and shape to claim. 200 for a pool changed, 201 for a new one."""
        pool, created = await service.pools.put(name, body)
        response.status_code = 201 if created else 200
        return pool

    @app.get("/pools/{name}", response_model=Pool, operation_id="get_pool")
    async def get_pool(name: str) -> Pool:
        return await service.pools.get(name)

    @app.delete("/pools/{name}", status_code=204, response_class=Response,
                operation_id="delete_pool", dependencies=[_needs(Role.OPERATOR)])  # fmt: skip
    async def delete_pool(name: str) -> Response:
        """Remove a warm pool and the VMs it holds unclaimed; VMs claimed from it stay."""
        await service.pools.delete(name)
        return Response(status_code=204)

    @app.get("/hosts", response_model=HostList, operation_id="list_hosts",
             responses={200: {"links": HOST_LINKS}})  # fmt: skip
    async def list_hosts(who: _Who) -> HostList:
        """The hosts that share this service's database (this one alone on SQLite): what
        each offers, holds and has free, its last heartbeat, and whether it is ``up`` or
        ``lost``; of the gold images each holds, those the token's tenant sees."""
        hosts = await service.fleet.hosts()
        sees = await service.catalog.seen_by(who.tenant_seen)
        for host in hosts:
            host.images = [image_id for image_id in host.images if sees(image_id)]
        return HostList(hosts=hosts)

    @app.delete("/hosts/{host_id}", status_code=204, response_class=Response,
                operation_id="forget_host", dependencies=[_needs(Role.OPERATOR)])  # fmt: skip
    async def forget_host(host_id: str) -> Response:
        """Forget a ``lost`` host that will not come back: its VMs end in ``error``
        (``host-lost``) and their callbacks are told; 409 ``host-up`` for a host that still
        heartbeats."""
        await service.forget_host(host_id)
        return Response(status_code=204)

    @app.exception_handler(GoldcloneError)
    async def _goldclone_error(_: Request, exc: GoldcloneError) -> JSONResponse:
        if exc.status == 500:  # a 502 says what the upstream did, and is the client's to see
            log.error("request failed: %s: %s%s", exc.code, exc.message, exc.context())
            return error_response(_INTERNAL)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        for error in errors:
            if error.get("type") == "json_invalid":
                return error_response(InvalidJSON(_not_json(error, exc.body)))
        return error_response(InvalidRequest(explain_errors(map(_in_body, errors))))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == MethodNotAllowed.status:
            response = error_response(MethodNotAllowed(str(exc.detail)))
            response.headers["Allow"] = ", ".join(_methods_of(app, request))
            return response
        if exc.status_code == RouteNotFound.status:
            return error_response(RouteNotFound(str(exc.detail)))
        if exc.status_code == InvalidJSON.status:  # FastAPI's answer to a body it cannot decode
            return error_response(InvalidJSON("the body is not valid JSON: it is not UTF-8 text"))
        # any other status Starlette raises itself keeps its status
        return JSONResponse(
            {"code": "http-error", "message": str(exc.detail)}, status_code=exc.status_code
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("request failed unexpectedly", exc_info=exc)
        return error_response(_INTERNAL)

    add_socket_routes(app, service, relay)
    describe_host(app, service, limits)
    app.add_middleware(BodyGuard, max_body_bytes=max_body_bytes, takes_body=_takes_body(app))
    # before any body is read
    app.add_middleware(BearerGuard, access=access or Access(), fleet_secret=fleet_secret)
    app.add_middleware(RequestLog, count=service.metrics.request)  # refusals too
    return app


DEFAULT_WAIT = 30.0
"""Seconds that ``GET /vms/{id}?wait=true`` waits without a ``timeout``."""
_Labels = Annotated[
    tuple[str, ...], Query(description="KEY=VALUE; several are ANDed", max_length=64)
]
_Statuses = Annotated[tuple[Status, ...], Query(max_length=8)]
_GuestPath = Annotated[str, Query(description="An absolute path in the guest", max_length=4096)]
_VMRef = Annotated[
    str,
    Path(description="The VM's ID, its name, or the start of its ID that no other of the "
         "caller's VMs has (400 `vm-ambiguous` lists those it could mean)."),
]  # fmt: skip


def _filter(who: Principal, labels: Sequence[str], statuses: Sequence[Status]) -> VMFilter | None:
    """The VMs that ``who`` asks for and may see; ``None``: every VM."""
    if not labels and not statuses and who.tenant_seen is None:
        return None
    try:
        wanted = parse_selectors(labels)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    return VMFilter(wanted, frozenset(statuses), who.tenant_seen)


def _principal(request: Request) -> Principal:
    """Who the request comes from, as ``BearerGuard`` found."""
    found: Principal = request.state.principal
    return found


_Who = Annotated[Principal, Depends(_principal)]


def _needs(role: Role) -> Any:
    """A route's dependency that refuses (403) a token whose role may not do what ``role``
    may."""

    def check(who: _Who) -> None:
        if not who.may(role):
            raise Forbidden(f"token {who.name} ({who.role} role) may not do this: it needs {role}")

    return Depends(check)


async def _server_sent(stream: AsyncIterator[Event | None]) -> AsyncIterator[str]:
    """Each event in the text/event-stream format; a comment when there is none for a while,
    so that proxies and clients know the stream is alive."""
    yield "retry: 1000\n\n"
    async for event in stream:
        if event is None:
            yield ": keepalive\n\n"
        else:
            yield f"id: {event.id}\nevent: {event.kind.value}\ndata: {json.dumps(event.data)}\n\n"


def _takes_body(app: FastAPI) -> Callable[[Scope], bool]:
    """Whether a request is for an endpoint that reads a body (its path and method match
    one)."""
    with_body = [route for route in app.routes if isinstance(route, APIRoute)
                 and route.body_field is not None]  # fmt: skip

    def takes_body(scope: Scope) -> bool:
        return any(route.matches(scope)[0] is Match.FULL for route in with_body)

    return takes_body


def _methods_of(app: FastAPI, request: Request) -> list[str]:
    """Every method that some route serves at the request's path (each route has one)."""
    methods: set[str] = set()
    for route in app.routes:
        if isinstance(route, APIRoute) and route.matches(request.scope)[0] is not Match.NONE:
            methods |= route.methods or set()
    return sorted(methods)


def _not_json(error: Mapping[str, Any], body: object) -> str:
    """Where the body stops being JSON: FastAPI gives the offset and json's reason."""
    offset, reason = error["loc"][-1], error.get("ctx", {}).get("error", "not JSON")
    if not isinstance(body, str) or not isinstance(offset, int):
        return "the body is not valid JSON"
    return (
        f"the body is not valid JSON: {explain_json_error(JSONDecodeError(reason, body, offset))}"
    )


def _in_body(error: Mapping[str, Any]) -> Mapping[str, Any]:
    """A request field's error located as the body's field (``image.checksum``), not under
    ``body``; a query or header parameter's keeps its place (``query.timeout``)."""
    loc = tuple(error.get("loc", ()))
    return {**error, "loc": loc[1:]} if loc[:1] == ("body",) else error
