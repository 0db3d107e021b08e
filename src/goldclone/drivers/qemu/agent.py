"""Talking to the QEMU guest agent in a machine (qemu-ga on ``org.qemu.guest_agent.0``), which
speaks QMP's messages on its virtio port without a greeting or capability negotiation.

The port is one stream for whoever connects: it can hold the reply to an earlier caller that
gave up waiting, which the next one would read as its own. So a connection first syncs
(``guest-sync-delimited`` with a random ID; everything before the 0xFF that precedes that
ID's reply is stale), and one that timed out or broke is dropped, for the next call to sync a
new one. A connection is kept and reused while it works: one opened right after another was
closed is often answered late (docs/design.md, "Memory templates"), which a claim from a warm
pool cannot afford.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
from pathlib import Path
from typing import Any

from goldclone.drivers.qemu.qmp import call, read_message
from goldclone.errors import QMPError, QMPRefused

_POLL_FIRST, _POLL_MAX = 0.01, 0.5
"""Seconds between asks whether a script has exited, doubling: each ask costs a guest under
TCG CPU time (at a steady 10 ms, qemu-ga took a tenth of it)."""
_CHUNK = 65536


class AgentLink:
    """The guest agent of one machine, through its socket; one command at a time."""

    def __init__(self, socket_path: Path) -> None:
        self._path = socket_path
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._lock = asyncio.Lock()

    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 5.0
    ) -> Any:
        """The ``return`` of ``command``; ``QMPRefused`` if the agent answers with an error,
        ``QMPError`` if it does not answer within ``timeout`` seconds or cannot be reached."""
        async with self._lock:
            try:
                return await asyncio.wait_for(self._execute(command, arguments), timeout)
            except QMPRefused:
                raise
            except TimeoutError:
                await self.close()
                raise QMPError(
                    f"guest agent {command} did not answer within {timeout:g} s"
                ) from None
            except (OSError, QMPError, asyncio.IncompleteReadError) as exc:
                await self.close()
                raise QMPError(f"guest agent {command}: {_reason(exc)}") from None

    async def run_script(self, script: str, timeout: float) -> None:
        """Run ``script`` with ``/bin/sh -s`` in the guest, the script on its standard input
        (never on a command line, since it may hold secrets); raises ``QMPError`` if the agent
        fails or the script does not exit 0 within ``timeout`` seconds. Each ask has all of
        that time too: qemu-ga answers ``guest-exec`` only once it has started the program,
        which took more than 5 s in guests restored 50 at once."""
        poll = _POLL_FIRST
        try:
            async with asyncio.timeout(timeout):
                started = await self.execute("guest-exec", {
                    "path": "/bin/sh", "arg": ["-s"], "capture-output": True,
                    "input-data": base64.b64encode(script.encode()).decode(),
                }, timeout=timeout)  # fmt: skip
                while not (status := await self._status(started["pid"], timeout)).get("exited"):
                    await asyncio.sleep(poll)
                    poll = min(poll * 2, _POLL_MAX)
        except TimeoutError:
            raise QMPError(f"the guest's script did not finish within {timeout:g} s") from None
        if status.get("exitcode") != 0:
            errors = base64.b64decode(str(status.get("err-data", ""))).decode(errors="replace")
            last = errors.strip().splitlines()[-1:] or ["no message"]
            raise QMPError(f"the guest's script exited with {status.get('exitcode')}: {last[0]}")

    async def read_file(self, path: str) -> str:
        """The text of the guest's file ``path``."""
        handle = await self.execute("guest-file-open", {"path": path, "mode": "r"})
        chunks = []
        try:
            while True:
                read = await self.execute("guest-file-read", {"handle": handle, "count": _CHUNK})
                chunks.append(base64.b64decode(read["buf-b64"]))
                if read["eof"] or not read["count"]:
                    break
        finally:
            await self.execute("guest-file-close", {"handle": handle})
        return b"".join(chunks).decode(errors="replace")

    async def write_file(self, path: str, content: str) -> None:
        """Replace the text of the guest's file ``path`` (made if missing; an existing one
        keeps its owner and mode)."""
        handle = await self.execute("guest-file-open", {"path": path, "mode": "w"})
        try:
            data = content.encode()
            await self.execute("guest-file-write", {
                "handle": handle, "buf-b64": base64.b64encode(data).decode(),
            })  # fmt: skip
        finally:
            await self.execute("guest-file-close", {"handle": handle})

    async def start_command(self, command: str) -> None:
        """Start ``/bin/sh -c command`` in the guest, without waiting for it."""
        await self.execute("guest-exec", {"path": "/bin/sh", "arg": ["-c", command]})

    async def close(self) -> None:
        if self._streams is not None:
            _, writer = self._streams
            self._streams = None
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _execute(self, command: str, arguments: dict[str, Any] | None) -> Any:
        if self._streams is None:
            reader, writer = await asyncio.open_unix_connection(str(self._path), limit=1 << 20)
            self._streams = reader, writer
            await _sync(reader, writer)
        reader, writer = self._streams
        return await call(reader, writer, command, arguments)

    async def _status(self, pid: int, timeout: float) -> dict[str, object]:
        status: dict[str, object] = await self.execute(
            "guest-exec-status", {"pid": pid}, timeout=timeout
        )
        return status


async def _sync(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """``guest-sync-delimited`` with a fresh ID, and skip what comes before its reply. (The
    0xFF that a client may send first, to reset the agent's parser after a half-written
    command, is left out: commands here are written whole, and the parse error that it causes
    cost each sync about 100 ms.)"""
    token = secrets.randbelow(1 << 31)
    sync = {"execute": "guest-sync-delimited", "arguments": {"id": token}}
    writer.write(json.dumps(sync).encode() + b"\n")
    await writer.drain()
    while True:
        await reader.readuntil(b"\xff")
        with contextlib.suppress(QMPError):  # half a stale line; look for the next 0xFF
            if (await read_message(reader)).get("return") == token:
                return


def _reason(exc: BaseException) -> str:
    if isinstance(exc, QMPError):
        return exc.message
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    if isinstance(exc, asyncio.IncompleteReadError):
        return "the channel closed"
    return str(exc)
