"""A CI job's VM as every integration makes and ends it: its create request (a warm pool's image
and shape, so the VM is claimed from the pool when it has one ready, or an image and shape
given as a create request's fields), and its deletion."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from goldclone.client import APIError, Client
from goldclone.models import CreateVMRequest
from goldclone.problems import explain_errors

SHAPE_KEYS = ("image", "cpus", "memory", "disk_size", "network_type", "ready_when", "egress",
              "network_group", "ttl")  # fmt: skip
"""What a job's image entry may give (docs/ci.md)."""


def vm_request(
    client: Client, pool: str | None, entry: Mapping[str, Any] | None, extra: Mapping[str, Any]
) -> CreateVMRequest:
    """The pool's image and shape, else ``entry``'s, with ``extra``'s fields over them (those
    that are ``None`` left out). Raises ``ValueError`` saying what is wrong."""
    if pool is not None:
        found = client.pool(pool)
        fields: dict[str, Any] = {
            "image": found.image.model_dump(mode="json", exclude_none=True), "cpus": found.cpus,
            "memory": found.memory, "disk_size": found.disk_size,
            "network_type": found.network_type,
        }  # fmt: skip
    elif entry is not None:
        fields = {key: entry[key] for key in SHAPE_KEYS if key in entry}
    else:
        raise ValueError("neither a pool nor an image is named")
    fields |= {key: value for key, value in extra.items() if value is not None}
    try:
        return CreateVMRequest.model_validate(fields)
    except ValidationError as exc:
        raise ValueError(explain_errors(exc.errors())) from None


def delete_vm(client: Client, vm: str) -> None:
    """Delete the VM; one that is gone already is no error."""
    try:
        client.delete(vm)
    except APIError as exc:
        if exc.code != "vm-not-found":
            raise
