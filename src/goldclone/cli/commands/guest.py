"""Reaching into a VM's guest: ssh to it, run a command in it, read its serial console."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import signal
import socket
import sys
import termios
import threading
import tty

from pydantic import ValidationError

from goldclone.cli.commands import CommandFailed, Context, UsageError, address_of, pairs
from goldclone.cli.exits import Exit
from goldclone.client.exec import ExecSession
from goldclone.exec_protocol import (
    MAX_INPUT_FRAME,
    TIMED_OUT_EXIT,
    ExecRequest,
    ExecResult,
    TerminalSize,
)
from goldclone.problems import explain_errors

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


def exec_command(ctx: Context) -> int:
    """Run the command after ``--`` in the guest, with this terminal's stdin, stdout and
    stderr, and exit with its exit code."""
    args = ctx.args
    if not args.remote_command:
        raise UsageError("give the command after --: goldclone exec ID -- COMMAND...")
    rows, cols = _terminal_size() if args.tty else (0, 0)
    try:
        request = ExecRequest(
            argv=args.remote_command, env=pairs("--env", args.env), cwd=args.cwd,
            tty=TerminalSize(rows=rows, cols=cols) if args.tty else None, timeout=args.timeout,
        )  # fmt: skip
    except ValidationError as exc:
        raise UsageError(explain_errors(exc.errors())) from None
    url, headers = ctx.api.websocket_target()
    result = asyncio.run(_exec(url, headers, args.id, request, args.tty))
    if result.error is not None:
        ctx.output.error(result.error["code"], result.error["message"])
        return result.exit_code or Exit.FAILED
    if result.timed_out:
        ctx.output.error("timed-out", f"the command was killed after {args.timeout:g} s")
        return TIMED_OUT_EXIT
    return result.exit_code or 0


async def _exec(
    url: str, headers: dict[str, str], vm_id: str, request: ExecRequest, terminal: bool
) -> ExecResult:
    session = await ExecSession.open(url, headers, vm_id, request)
    loop = asyncio.get_running_loop()
    # stdin and resizes, in their order; bounded, so a command that reads slowly holds the
    # reading thread back instead of filling memory
    inputs: asyncio.Queue[bytes | tuple[int, int]] = asyncio.Queue(maxsize=16)
    raw = terminal and os.isatty(0)
    saved = termios.tcgetattr(0) if raw else None
    sender = asyncio.create_task(_send_inputs(session, inputs))
    try:
        if raw:
            tty.setraw(0)
            resized = lambda: loop.create_task(inputs.put(_terminal_size()))  # noqa: E731
            loop.add_signal_handler(signal.SIGWINCH, resized)
        _StdinReader(loop, inputs).start()
        async for stream, data in session.output():
            out = sys.stdout.buffer if stream == 1 else sys.stderr.buffer
            out.write(data)
            out.flush()
    finally:
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
            loop.remove_signal_handler(signal.SIGWINCH)
        sender.cancel()
        await session.close()
    assert session.result is not None
    return session.result


async def _send_inputs(
    session: ExecSession, inputs: asyncio.Queue[bytes | tuple[int, int]]
) -> None:
    while True:
        item = await inputs.get()
        if isinstance(item, bytes):
            await session.write(item)
        else:
            await session.resize(*item)


class _StdinReader(threading.Thread):
    """Reads stdin in a thread of its own (a terminal cannot be waited on by every event
    loop) into ``inputs``, then an empty chunk at its end. A daemon: a read still waiting
    when the command ends does not keep the process."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, inputs: asyncio.Queue[bytes | tuple[int, int]]
    ) -> None:
        super().__init__(daemon=True)
        self._loop, self._inputs = loop, inputs

    def run(self) -> None:
        while True:
            try:
                data = os.read(0, MAX_INPUT_FRAME)
            except OSError:
                data = b""
            try:
                asyncio.run_coroutine_threadsafe(self._inputs.put(data), self._loop).result()
            except (RuntimeError, concurrent.futures.CancelledError):
                return  # the loop has ended: so has the command
            if not data:
                return


def _terminal_size() -> tuple[int, int]:
    size = shutil.get_terminal_size()
    return size.lines, size.columns
