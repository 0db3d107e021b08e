"""The fleet commands: hosts [list], hosts forget."""

from __future__ import annotations

from goldclone.cli.commands import Context, reported
from goldclone.cli.exits import Exit


def hosts(ctx: Context) -> Exit:
    action = ctx.args.host_command or "list"
    return {"list": _list, "forget": _forget}[action](ctx)


def _list(ctx: Context) -> Exit:
    from goldclone.cli.display import host_table

    found = ctx.api.hosts()
    ctx.output.listing("hosts", found, host_table(found))
    return Exit.OK


def _forget(ctx: Context) -> Exit:
    ctx.api.forget_host(ctx.args.id)
    return reported(ctx, "forgot", "forgotten", [ctx.args.id])
