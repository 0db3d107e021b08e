"""``goldclone port-forward``: a guest's TCP port on a local one, through the API."""

from __future__ import annotations

import asyncio
import contextlib

from goldclone.cli.commands import Context, UsageError
from goldclone.cli.exits import Exit
from goldclone.client.ports import forward


def port_forward(ctx: Context) -> Exit:
    """Serve until Ctrl-C, which ends it cleanly (exit 0)."""
    local, _, remote = ctx.args.ports.rpartition(":")
    if not remote.isdigit() or not 0 < int(remote) < 65536 or not (local or "0").isdigit():
        raise UsageError(f"{ctx.args.ports}: expected [LOCAL:]REMOTE, ports (LOCAL 0: any free)")
    ctx.api.get(ctx.args.id)  # the VM is there, before anything listens
    url, headers = ctx.api.websocket_target()

    def ready(port: int) -> None:
        ctx.output.show(f"forwarding {ctx.args.address}:{port} to port {remote} of {ctx.args.id}")
        ctx.output.value({"address": ctx.args.address, "port": port, "remote_port": int(remote)})

    def refused(why: str) -> None:
        ctx.output.error("connection-refused", why)

    serving = forward(url, headers, ctx.args.id, int(remote), (ctx.args.address,
                      int(local or remote)), ready, refused)  # fmt: skip
    with contextlib.suppress(KeyboardInterrupt):
        try:
            asyncio.run(serving)
        except OSError as exc:
            raise UsageError(f"cannot listen on {ctx.args.address}:{local or remote}: "
                             f"{exc.strerror}") from None  # fmt: skip
    return Exit.OK
