"""The ``goldclone`` entry point: parse, run the command, and turn every way it can end into
one line on stderr and an exit code (``goldclone.cli.exits``). No traceback reaches the user."""

from __future__ import annotations

import argparse
import os
import sys

from goldclone.cli import parser as command_line
from goldclone.cli.commands import (
    Command,
    CommandFailed,
    Context,
    UsageError,
    files,
    gitlab,
    guest,
    host,
    hosts,
    images,
    pools,
    ports,
    vms,
)
from goldclone.cli.exits import Exit
from goldclone.cli.output import Output
from goldclone.client import (
    APIError,
    Client,
    Failed,
    ServerUnreachable,
    VMFailed,
    WaitTimeout,
    default_url,
)
from goldclone.errors import GoldcloneError

COMMANDS: dict[str, Command] = {
    "serve": host.serve,
    "demo-image": host.demo_image,
    "completion": host.completion,
    "doctor": host.doctor,
    "create": vms.create,
    "get": vms.get,
    "ip": vms.ip,
    "list": vms.list_vms,
    "delete": vms.delete,
    "renew": vms.renew,
    "wait": vms.wait_command,
    "images": images.images,
    "hosts": hosts.hosts,
    "pools": pools.pools,
    "templates": pools.templates,
    "ssh": guest.ssh,
    "exec": guest.exec_command,
    "cp": files.cp,
    "port-forward": ports.port_forward,
    "gitlab-executor": gitlab.gitlab_executor,
    "logs": guest.logs,
}
LOCAL_COMMANDS = frozenset({"serve", "demo-image", "completion", "doctor"})
"""The commands that do not talk to a server."""


def main(argv: list[str] | None = None) -> int:
    parser = command_line.build()
    _complete(parser)
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = _parse(parser, argv)
    except command_line.BadUsage as exc:
        return _bad_usage(exc, "--json" in argv)
    args.json = getattr(args, "json", False)
    output = Output(args.command, args.json)
    ctx = Context(args, output)
    try:
        if args.command in LOCAL_COMMANDS:
            return COMMANDS[args.command](ctx)
        args.url = getattr(args, "url", None) or default_url()
        with Client(args.url) as ctx.client:
            return COMMANDS[args.command](ctx)
    except KeyboardInterrupt:
        return _interrupted(ctx)
    except BrokenPipeError:
        return _broken_pipe(output)
    except UsageError as exc:
        output.error("usage-error", str(exc))
        return Exit.USAGE
    except VMFailed as exc:
        output.value(exc.vm)
        output.error(exc.code, exc.message, subject=f"VM {exc.vm.id}")
        return Exit.FAILED
    except (Failed, CommandFailed) as exc:
        output.error(exc.code, exc.message)
        return Exit.FAILED
    except WaitTimeout as exc:
        output.error("wait-timeout", str(exc))
        return Exit.TIMEOUT
    except APIError as exc:
        output.error(exc.code, exc.message)
        return Exit.USAGE if exc.status in (400, 422) else Exit.FAILED
    except ServerUnreachable as exc:
        output.error("server-unreachable", str(exc))
        return Exit.UNREACHABLE
    except GoldcloneError as exc:
        output.error(exc.code, exc.message)
        return Exit.FAILED


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The arguments; for ``ssh`` and ``exec``, what follows ``--`` is the remote command,
    kept whole."""
    if "--" in argv:
        split = argv.index("--")
        args = parser.parse_args(argv[:split])
        if args.command in ("ssh", "exec"):
            args.remote_command = argv[split + 1 :]
            return args
    args = parser.parse_args(argv)
    args.remote_command = []
    return args


def _bad_usage(exc: command_line.BadUsage, json: bool) -> int:
    """argparse's two lines (the usage, then the error), or with ``--json`` one object."""
    if json:
        Output(exc.prog.removeprefix("goldclone "), json=True).error("usage-error", exc.message)
    else:
        sys.stderr.write(f"{exc.usage}{exc.prog}: error: {exc.message}\n")
    return Exit.USAGE


def _complete(parser: argparse.ArgumentParser) -> None:
    """Answer the shell's completion request (``goldclone completion``'s scripts make it)."""
    if "_ARGCOMPLETE" in os.environ:
        import argcomplete

        argcomplete.autocomplete(parser)


def _interrupted(ctx: Context) -> int:
    if ctx.in_progress:
        ctx.output.error(
            "interrupted",
            f"interrupted; VM {ctx.in_progress} goes on being created. Delete it with: "
            f"goldclone delete {ctx.in_progress}",
        )
    else:
        ctx.output.error("interrupted", "interrupted")
    return Exit.INTERRUPTED


def _broken_pipe(output: Output) -> int:
    """The reader of our output went away (``| head``): say so once, and make sure that the
    interpreter's own flush at exit does not fail again on the closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    output.error("broken-pipe", "the output was closed before all of it was written")
    return Exit.BROKEN_PIPE
