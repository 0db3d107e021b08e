"""Warm pools and memory templates: pools [list], pools set, pools delete; templates [list],
templates create, templates delete."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from goldclone.cli.commands import CommandFailed, Context, UsageError, reported
from goldclone.cli.commands.vms import image_fields, read_json_object, ready_when_field, validated
from goldclone.cli.exits import Exit
from goldclone.client import WaitTimeout
from goldclone.models import (
    ErrorBody,
    Pool,
    PoolRequest,
    PoolStatus,
    Template,
    TemplateRequest,
    TemplateStatus,
)

POLL = 0.25
"""Seconds between two reads of a pool or template being waited for (they have no ``?wait``)."""
T = TypeVar("T")


def pools(ctx: Context) -> Exit:
    action = ctx.args.pool_command or "list"
    return {"list": _list_pools, "set": _set_pool, "delete": _delete_pool}[action](ctx)


def templates(ctx: Context) -> Exit:
    action = ctx.args.template_command or "list"
    actions = {"list": _list_templates, "create": _create_template, "delete": _delete_template}
    return actions[action](ctx)


def _list_pools(ctx: Context) -> Exit:
    from goldclone.cli.display import pool_table

    found = ctx.api.pools()
    ctx.output.listing("pools", found, pool_table(found))
    return Exit.OK


def _set_pool(ctx: Context) -> Exit:
    """PUT the pool's whole definition: ``--from FILE`` and the options, each option replacing
    one field of the file; a field given by neither takes its default."""
    args = ctx.args
    body: dict[str, Any] = read_json_object(args.from_file) if args.from_file else {}
    body |= image_fields(body, args)
    if "image" not in body:
        raise UsageError("give IMAGE_URL and --checksum, or --from FILE")
    options = {"cpus": args.cpus, "memory": args.memory, "disk_size": args.disk_size,
               "network_type": args.network, "size": args.size}  # fmt: skip
    body |= {name: value for name, value in options.items() if value is not None}
    pool = ctx.api.put_pool(args.name, validated(PoolRequest, body))
    if args.wait:
        pool = _wait(lambda: ctx.api.pool(args.name), _pool_settled, f"pool {args.name}",
                     args.timeout)  # fmt: skip
    ctx.output.show(f"{pool.name} {pool.status.value} ({pool.ready} of {pool.size} ready)")
    ctx.output.value(pool)
    return Exit.OK


def _delete_pool(ctx: Context) -> Exit:
    ctx.api.delete_pool(ctx.args.name)
    return reported(ctx, "deleted", "deleted", [ctx.args.name])


def _list_templates(ctx: Context) -> Exit:
    from goldclone.cli.display import template_table

    image_id = getattr(ctx.args, "image_id", None)  # none without the action word
    images = [ctx.api.image(image_id)] if image_id else ctx.api.images()
    found = [template for image in images for template in image.templates]
    ctx.output.listing("templates", found, template_table(found))
    return Exit.OK


def _create_template(ctx: Context) -> Exit:
    args = ctx.args
    shape = {"cpus": args.cpus, "memory": args.memory, "disk_size": args.disk_size}
    body: dict[str, Any] = shape | ready_when_field(args)
    request = validated(TemplateRequest, {k: v for k, v in body.items() if v is not None})
    template = ctx.api.create_template(args.image_id, request)
    if args.wait:

        def current() -> Template:
            found = [t for t in ctx.api.templates(args.image_id) if t.id == template.id]
            if not found:
                raise CommandFailed("template-not-found", f"template {template.id} is gone")
            return found[0]

        template = _wait(current, _template_settled, f"template {template.id}", args.timeout)
    ctx.output.show(f"{template.id} {template.status.value}")
    ctx.output.value(template)
    return Exit.OK


def _delete_template(ctx: Context) -> Exit:
    ctx.api.delete_template(ctx.args.image_id, ctx.args.template_id)
    return reported(ctx, "deleted", "deleted", [ctx.args.template_id])


def _pool_settled(pool: Pool) -> bool:
    if pool.status is PoolStatus.ERROR:
        raise _failed(pool.error, f"pool {pool.name}")
    return pool.ready >= pool.size


def _template_settled(template: Template) -> bool:
    if template.status is TemplateStatus.ERROR:
        raise _failed(template.error, f"template {template.id}")
    return template.status is TemplateStatus.READY


def _failed(error: ErrorBody | None, what: str) -> CommandFailed:
    if error is None:
        return CommandFailed("failed", f"{what} failed")
    return CommandFailed(error.code, error.message)


def _wait(read: Callable[[], T], settled: Callable[[T], bool], what: str, timeout: float) -> T:
    """``read()`` again every ``POLL`` seconds until ``settled`` says it is (or raises)."""
    deadline = time.monotonic() + timeout
    while not settled(found := read()):
        if time.monotonic() >= deadline:
            status = getattr(found, "status", "on its way")
            raise WaitTimeout(what, str(status), timeout)
        time.sleep(POLL)
    return found
