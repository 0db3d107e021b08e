"""How the API describes itself in ``/openapi.json``: its error answers, its event stream,
the links between operations, and what this host accepts."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from goldclone.errors import answer_codes
from goldclone.models import ErrorBody
from goldclone.service import VMService
from goldclone.settings import Limits
from goldclone.store.event_log import EventKind

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": " or ".join(codes)}
    for status, codes in answer_codes().items()
}
TEXT = {"content": {"text/plain": {"schema": {"type": "string"}}}}
TAR_TYPE = "application/x-tar"
TAR = {"content": {TAR_TYPE: {"schema": {"type": "string", "format": "binary"}}}}


def _event(kinds: tuple[EventKind, ...], data: dict[str, Any]) -> dict[str, Any]:
    """One Server-Sent Event of one of ``kinds``, as an SSE parser reads it: its ``data`` is
    JSON of the schema ``data``."""
    return {
        "type": "object",
        "required": ["id", "event", "data"],
        "properties": {
            "id": {"type": "string", "pattern": "^[0-9]+$"},
            "event": {"type": "string", "enum": [kind.value for kind in kinds]},
            "data": {"type": "string", "contentMediaType": "application/json",
                     "contentSchema": data},
        },
    }  # fmt: skip


_EVENTS = {
    "oneOf": [
        _event((EventKind.VM, EventKind.VM_DELETED), {"$ref": "#/components/schemas/VM"}),
        _event((EventKind.IMAGE, EventKind.IMAGE_DELETED), {"$ref": "#/components/schemas/Image"}),
        _event((EventKind.POOL, EventKind.POOL_DELETED), {"$ref": "#/components/schemas/Pool"}),
        _event((EventKind.DROPPED,), {
            "type": "object",
            "required": ["after", "resumes_at"],
            "properties": {"after": {"type": "integer"}, "resumes_at": {"type": "integer"}},
        }),
    ]
}  # fmt: skip
"""Each event of ``GET /events``, for OpenAPI 3.1, whose media type has no ``itemSchema``:
schema-driven clients (schemathesis) take the ``schema`` of ``text/event-stream`` as that of
one event."""
EVENT_STREAM = {"content": {"text/event-stream": {"schema": _EVENTS}}}


VM_LINKS = {
    name: {"operationId": operation, "parameters": {"vm_id": "$response.body#/id"}}
    for name, operation in (
        ("GetVM", "get_vm"),
        ("DeleteVM", "delete_vm"),
        ("GetFiles", "get_files"),
        ("MakeImage", "make_image"),
    )
}
POOL_LINKS = {
    name: {"operationId": operation, "parameters": {"name": "$response.body#/name"}}
    for name, operation in (("GetPool", "get_pool"), ("DeletePool", "delete_pool"))
}
HOST_LINKS = {
    "ForgetHost": {"operationId": "forget_host",
                   "parameters": {"host_id": "$response.body#/hosts/0/id"}},
}  # fmt: skip
IMAGE_LINKS = {
    "DeleteImage": {"operationId": "delete_image",
                    "parameters": {"image_id": "$response.body#/id"}},
    "PushImage": {"operationId": "push_image", "parameters": {"image_id": "$response.body#/id"}},
}  # fmt: skip


def describe_host(app: FastAPI, service: VMService, limits: Limits | None) -> None:
    """Put what this host accepts into the OpenAPI description: its bounds on ``cpus`` and
    ``memory`` (of VMs, templates and pools), the network types it offers, its longest lease
    (and whether none may be asked for), and that a PATCH changes something."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()
        schemas = schema["components"]["schemas"]
        for name in ("CreateVMRequest", "TemplateRequest", "PoolRequest"):
            if limits is not None:
                fields = schemas[name]["properties"]
                fields["cpus"] |= {"minimum": limits.min_cpus, "maximum": limits.max_cpus}
                least = max(limits.min_memory_mb, fields["memory"].get("minimum", 0))
                fields["memory"] |= {"minimum": least, "maximum": limits.max_memory_mb}
        for name in ("CreateVMRequest", "PoolRequest"):
            schemas[name]["properties"]["network_type"]["enum"] = service.network_types()
        leases = service.leases
        for name in ("CreateVMRequest", "UpdateVMRequest"):
            ttl = schemas[name]["properties"]["ttl"]
            seconds = {"type": "integer", "minimum": 0 if leases.allow_none else 1,
                       "maximum": leases.maximum}  # fmt: skip
            ttl["anyOf"] = [seconds, {"type": "null"}] if leases.allow_none else [seconds]
        schemas["UpdateVMRequest"]["minProperties"] = 1
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
