"""The VM commands: create, get, ip, list, delete, renew, wait."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from goldclone.cli.commands import Context, UsageError, address_of, pairs
from goldclone.cli.display import expiry
from goldclone.cli.exits import Exit
from goldclone.client import APIError
from goldclone.fields import IMAGE_ID_PATTERN
from goldclone.models import VM, CreateVMRequest, Status, UpdateVMRequest
from goldclone.problems import explain_validation_error

_Request = TypeVar("_Request", bound=BaseModel)


def create(ctx: Context) -> Exit:
    vm = ctx.api.create(create_request(ctx.args))
    if not ctx.args.wait:
        ctx.output.show(vm.id)
        ctx.output.value(vm)
        return Exit.OK
    ctx.in_progress = vm.id
    ctx.output.show(f"created VM {vm.id}")
    vm = wait(ctx, vm, ctx.args.timeout)
    ctx.output.value(vm)
    return Exit.OK


def get(ctx: Context) -> Exit:
    from goldclone.cli.display import vm_detail

    vm = ctx.api.get(ctx.args.id)
    ctx.output.show(vm_detail(vm))
    ctx.output.value(vm)
    return Exit.OK


def ip(ctx: Context) -> Exit:
    vm = ctx.api.get(ctx.args.id)
    if ctx.args.wait and not vm.ip_address:
        ctx.in_progress = vm.id
        vm = ctx.api.wait_until_running(vm.id, ctx.args.timeout)
    address = address_of(vm, hint="; --wait waits for one")
    ctx.output.show(address)
    ctx.output.value({"id": vm.id, "ip_address": address})
    return Exit.OK


def list_vms(ctx: Context) -> Exit:
    statuses = [Status(status) for status in ctx.args.statuses]
    vms = ctx.api.list_vms(pairs("--label", ctx.args.labels), statuses)
    if ctx.args.quiet:
        for vm in vms:
            ctx.output.show(vm.id)
    else:
        from goldclone.cli.display import vm_table

        ctx.output.show(vm_table(vms))
    ctx.output.value({"vms": [vm.model_dump(mode="json") for vm in vms]})
    return Exit.OK


def delete(ctx: Context) -> Exit:
    """Delete every VM asked for, even when some fail; each failure is reported."""
    args, output = ctx.args, ctx.output
    if args.ids and args.labels:
        raise UsageError("give the IDs of the VMs or --label KEY=VALUE, not both")
    if not args.ids and not args.labels:
        raise UsageError("give the IDs of the VMs to delete, or --label KEY=VALUE")
    ids: list[str] = args.ids
    if args.labels:
        from goldclone.cli.display import vm_table

        matching = ctx.api.list_vms(pairs("--label", args.labels))
        ids = [vm.id for vm in matching]
        output.show(f"deleting {len(ids)} VM{'s' if len(ids) != 1 else ''}:")
        output.show(vm_table(matching))
    deleted: list[str] = []
    failed: list[dict[str, str]] = []
    for vm_id in ids:
        try:
            ctx.api.delete(vm_id)
        except APIError as exc:
            output.error(exc.code, exc.message, subject=vm_id)
            failed.append({"id": vm_id, "code": exc.code, "message": exc.message})
            continue
        deleted.append(vm_id)
        output.show(f"deleted {vm_id}")
    output.value({"deleted": deleted, "failed": failed})
    return Exit.FAILED if failed else Exit.OK


def renew(ctx: Context) -> Exit:
    vm = ctx.api.update(ctx.args.id, validated(UpdateVMRequest, {"ttl": ctx.args.ttl}))
    ctx.output.show(f"{vm.id} expires at {expiry(vm)}")
    ctx.output.value(vm)
    return Exit.OK


def wait_command(ctx: Context) -> Exit:
    vm = wait(ctx, ctx.api.get(ctx.args.id), ctx.args.timeout)
    ctx.output.value(vm)
    return Exit.OK


def wait(ctx: Context, vm: VM, timeout: float) -> VM:
    """Wait for ``vm`` to run; for people, show its phases and download as they happen and
    end with its IP. Ctrl-C meanwhile says that the VM goes on."""
    ctx.in_progress = vm.id
    if ctx.output.json:
        vm = ctx.api.wait_until_running(vm.id, timeout)
    else:
        from goldclone.cli.display import WaitDisplay

        with WaitDisplay(ctx.output.console) as display:
            vm = ctx.api.wait_until_running(vm.id, timeout, on_update=display.update)
        ctx.output.show(vm.ip_address)
    ctx.in_progress = None
    return vm


# -- the create request --------------------------------------------------------------------------


def create_request(args: Any) -> CreateVMRequest:
    """The request from ``--from FILE`` and the options; each option given replaces one field
    of the file (``IMAGE_URL`` its ``image.url``, ``--checksum`` its ``image.checksum``)."""
    body: dict[str, Any] = {}
    if args.from_file is not None:
        body = read_json_object(args.from_file)
    elif not (args.image_url and (args.checksum or _whole_image(args.image_url))):
        raise UsageError(
            "give IMAGE_URL and --checksum, oci://REFERENCE, an image's ID, or --from FILE"
        )
    body |= image_fields(body, args)
    options = {
        "cpus": args.cpus,
        "memory": args.memory,
        "disk_size": args.disk_size,
        "network_type": args.network,
        "callback_url": args.callback_url,
        "headless": False if args.gui else None,
        "name": args.name,
        "start": args.start,
        "on_poweroff": args.on_poweroff,
        "ttl": args.ttl,
    }
    body |= {name: value for name, value in options.items() if value is not None}
    body |= _guest_fields(args)
    return validated(CreateVMRequest, body)


OCI = "oci://"
"""How an image argument names a registry reference rather than a URL."""


def image_fields(body: dict[str, Any], args: Any) -> dict[str, Any]:
    """``body``'s ``image`` with ``IMAGE_URL``, ``--checksum`` and ``--checksum-type`` in place
    of its fields, as a request field; none if neither has one. An ``oci://`` argument is a
    registry reference: it replaces the whole image."""
    image = dict(body["image"]) if isinstance(body.get("image"), dict) else {}
    if args.image_url is not None and _whole_image(args.image_url):
        if args.checksum is not None or args.checksum_type is not None:
            raise UsageError("an oci:// image or an image's ID takes no --checksum")
        if args.image_url.startswith(OCI):
            return {"image": {"oci": args.image_url.removeprefix(OCI)}}
        return {"image": {"id": args.image_url}}
    options = {"url": args.image_url, "checksum": args.checksum,
               "checksum_type": args.checksum_type}  # fmt: skip
    image |= {name: value for name, value in options.items() if value is not None}
    return {"image": image} if image else {}


def _whole_image(argument: str) -> bool:
    """Whether an image argument names its image alone: a registry reference, or the ID of a
    gold image (``sha256-HEX``)."""
    return argument.startswith(OCI) or re.fullmatch(IMAGE_ID_PATTERN, argument) is not None


def ready_when_field(args: Any) -> dict[str, Any]:
    """``--ready-when`` as a request field, if given."""
    if args.ready_when is None:
        return {}
    try:
        return {"ready_when": json.loads(args.ready_when)}
    except ValueError:
        raise UsageError("--ready-when: expected JSON, e.g. '{\"tcp\": 22}'") from None


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from a file; a usage error says where the JSON is broken."""
    text = read_text(path)
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
    if not isinstance(body, dict):
        raise UsageError(f"{path}: expected a JSON object (a request body)")
    return body


def validated(model: type[_Request], body: dict[str, Any]) -> _Request:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise UsageError(explain_validation_error(exc)) from None


def _guest_fields(args: Any) -> dict[str, object]:
    """``--ssh-key``, ``--user-data``, ``--metadata``, ``--label`` and ``--ready-when`` as
    request fields; files are read here, so a missing one is a usage error."""
    fields: dict[str, object] = {}
    if args.ssh_keys:
        keys = [line.strip() for path in args.ssh_keys for line in read_text(path).splitlines()]
        fields["ssh_authorized_keys"] = [key for key in keys if key and not key.startswith("#")]
    if args.user_data is not None:
        fields["user_data"] = read_text(args.user_data)
    if args.metadata:
        fields["metadata"] = pairs("--metadata", args.metadata)
    if args.labels:
        fields["labels"] = pairs("--label", args.labels)
    return fields | ready_when_field(args)


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UsageError(f"cannot read {path}: {reason}") from None
