"""Reaching into a VM's guest: ssh to it, read its serial console."""

from __future__ import annotations

import os
import shutil
import socket
import sys

from goldclone.cli.commands import CommandFailed, Context, UsageError, address_of
from goldclone.cli.exits import Exit

SSH_OPTIONS = (
    # VMs are disposable and their addresses come back with new host keys: remembering them
    # would only make the next VM at an address look like an attack.
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR",
)  # fmt: skip
SSH_PROBE_TIMEOUT = 5.0


def ssh(ctx: Context) -> Exit:
    """Run ssh in place of this process, so that its terminal, exit code and signals are the
    user's; nothing of goldclone stays in between."""
    args = ctx.args
    address = address_of(ctx.api.get(args.id))
    program = shutil.which("ssh")
    if program is None:
        raise UsageError("ssh is not installed (Debian: apt install openssh-client)")
    _check_ssh_server(address)
    command: list[str] = args.remote_command
    identity = ["-i", str(args.identity)] if args.identity else []
    argv = ["ssh", *SSH_OPTIONS, *identity, f"{args.user}@{address}", *command]
    sys.stdout.flush()
    os.execv(program, argv)


def _check_ssh_server(address: str) -> None:
    """Say in one line that a guest refuses port 22 (the demo guest has no SSH server),
    rather than ssh's ``Connection refused``; anything else is ssh's to say."""
    try:
        socket.create_connection((address, 22), timeout=SSH_PROBE_TIMEOUT).close()
    except ConnectionRefusedError:
        raise CommandFailed(
            "no-ssh-server",
            f"the guest at {address} refuses connections on port 22: it runs no SSH server "
            "(the demo guest has none; a cloud image's starts as it boots)",
        ) from None
    except OSError:
        pass


def logs(ctx: Context) -> Exit:
    for text in ctx.api.console(ctx.args.id, follow=ctx.args.follow):
        sys.stdout.write(text)
        sys.stdout.flush()
    return Exit.OK
