"""A minimal QMP client: one short connection per command, every step under a timeout.

QEMU's monitor socket serves one client at a time, so callers hold the VM's lock around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from goldclone.errors import QMPError, QMPRefused


async def qmp_execute(
    socket_path: Path, command: str, arguments: dict[str, Any] | None = None, timeout: float = 5.0
) -> Any:
    """Run one QMP ``command`` and return its ``return`` value."""
    work = asyncio.wait_for(_execute(socket_path, command, arguments), timeout)
    return await _as_qmp_error(work, f"QMP {command}", f"on {socket_path.name} timed out "
                               f"after {timeout:g} s")  # fmt: skip


async def _execute(socket_path: Path, command: str, arguments: dict[str, Any] | None) -> Any:
    reader, writer = await asyncio.open_unix_connection(str(socket_path), limit=1 << 20)
    try:
        await read_message(reader)  # greeting
        await call(reader, writer, "qmp_capabilities", None)
        return await call(reader, writer, command, arguments)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def call(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    command: str,
    arguments: dict[str, Any] | None,
) -> Any:
    message: dict[str, Any] = {"execute": command}
    if arguments:
        message["arguments"] = arguments
    writer.write(json.dumps(message).encode() + b"\n")
    await writer.drain()
    while True:
        reply = await read_message(reader)
        if "return" in reply:
            return reply["return"]
        if "error" in reply:
            raise QMPRefused(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")
        # anything else is an asynchronous event; skip it


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any]:
    line = await reader.readline()
    if not line:
        raise QMPError("QMP connection closed")
    try:
        message = json.loads(line)
    except ValueError:
        # e.g. what a guest agent's channel still held from before a restore
        raise QMPError("QMP sent a line that is not JSON") from None
    if not isinstance(message, dict):
        raise QMPError("QMP sent something that is not an object")
    return message


async def qmp_execute_with_fd(
    socket_path: Path,
    fd: int,
    command: str,
    arguments: dict[str, Any],
    timeout: float = 10.0,
) -> Any:
    """Hand QEMU the open file ``fd`` as ``fd:goldclone`` (``getfd``, over SCM_RIGHTS), then
    run ``command`` in the same session, where that name is known. For migrations to and from
    files that QEMU, running as an unprivileged user, could not open itself."""
    work = asyncio.to_thread(_execute_with_fd, socket_path, fd, command, arguments, timeout)
    return await _as_qmp_error(work, f"QMP {command}", f"on {socket_path.name} timed out "
                               f"after {timeout:g} s")  # fmt: skip


async def _as_qmp_error(work: Awaitable[Any], what: str, timed_out: str) -> Any:
    """``work``'s result; its timeout and socket errors become a ``QMPError`` naming
    ``what``."""
    try:
        return await work
    except TimeoutError:
        raise QMPError(f"{what} {timed_out}") from None
    except OSError as exc:
        raise QMPError(f"{what}: {exc.strerror or exc}") from None


FD_NAME = "goldclone"


def _execute_with_fd(
    socket_path: Path, fd: int, command: str, arguments: dict[str, Any], timeout: float
) -> Any:
    """``qmp_execute_with_fd`` with a blocking socket, in a worker thread."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        replies = sock.makefile("rb")

        def call(name: str, args: dict[str, Any] | None, fds: list[int] | None = None) -> Any:
            message = json.dumps({"execute": name, "arguments": args or {}}).encode() + b"\n"
            if fds:
                socket.send_fds(sock, [message], fds)
            else:
                sock.sendall(message)
            while True:
                line = replies.readline()
                if not line:
                    raise QMPError("QMP connection closed")
                reply = json.loads(line)
                if "return" in reply:
                    return reply["return"]
                if "error" in reply:
                    raise QMPError(f"QMP {name}: {reply['error'].get('desc', reply['error'])}")

        replies.readline()  # greeting
        call("qmp_capabilities", None)
        call("getfd", {"fdname": FD_NAME}, [fd])
        return call(command, arguments)
