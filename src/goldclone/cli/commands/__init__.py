"""What each ``goldclone`` command does, by concept: the VMs, the gold images, the guest
(ssh, console) and the host (serve, doctor, demo image, completion)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from goldclone.cli.exits import Exit
from goldclone.cli.output import Output
from goldclone.client import Client
from goldclone.models import VM


class UsageError(Exception):
    """Bad options or input: exit 2, with this message."""


class CommandFailed(Exception):
    """The command cannot do what was asked (exit 1): its error ``code`` and ``message``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def reported(ctx: Context, verb: str, key: str, ids: list[str]) -> Exit:
    """What was done to each of ``ids``: ``VERB ID`` lines, or ``{key: ids}`` as JSON."""
    for done in ids:
        ctx.output.show(f"{verb} {done}")
    ctx.output.value({key: ids})
    return Exit.OK


def address_of(vm: VM, hint: str = "") -> str:
    """The VM's IP address; ``CommandFailed`` (``no-ip``) while it has none."""
    if not vm.ip_address:
        raise CommandFailed("no-ip", f"VM {vm.id} has no IP address (it is {vm.status.value})"
                                     f"{hint}")  # fmt: skip
    return vm.ip_address


@dataclass
class Context:
    """One run of a command: its arguments, its output, and what Ctrl-C must mention."""

    args: argparse.Namespace
    output: Output
    client: Client | None = None
    in_progress: str | None = None
    """The VM being created or waited for: on Ctrl-C it goes on, and the user is told so."""

    @property
    def api(self) -> Client:
        if self.client is None:
            raise RuntimeError(f"{self.args.command} is not a client command")
        return self.client


Command = Callable[[Context], int]
"""A command: its exit code, an ``Exit`` or, for ``exec``, the remote command's own."""


def pairs(option: str, items: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` items as a map; a usage error names the option of one without ``=``."""
    split = [item.partition("=") for item in items]
    if bad := [key for key, equals, _ in split if not equals]:
        raise UsageError(f"{option} {bad[0]}: expected KEY=VALUE")
    return {key: value for key, _, value in split}
