"""The host's end of the helper's wire (``guest.helper``): one connection per machine, many
sessions on it, each a command or a connection to a guest port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from goldclone.errors import ExecFailed, ExecUnavailable
from goldclone.guest import helper
from goldclone.guest.helper import CREDIT_BODY, HEADER, MAX_PAYLOAD, WINDOW

log = logging.getLogger(__name__)

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
SYNC_TIMEOUT = 5.0
"""How long a helper has to answer a new connection before the guest is said to have none."""
_CREDIT_BATCH = WINDOW // 4


@dataclass(frozen=True)
class Output:
    """Bytes a session's command wrote: ``stream`` 1 for stdout (or a TTY, or a socket),
    2 for stderr."""

    stream: int
    data: bytes


@dataclass(frozen=True)
class Exit:
    """How a session ended: the command's ``exit_code`` (128 + the signal that killed it), or
    ``error``, why it could not run (then ``exit_code`` is the shell's: 127 not found, 126
    not executable)."""

    exit_code: int | None
    signal: int | None = None
    error: str | None = None


class Channel:
    """A synced connection to one machine's helper."""

    def __init__(self, streams: Streams, name: str) -> None:
        self._reader, self._writer = streams
        self._name = name
        self._sessions: dict[int, Session] = {}
        self._next_sid = 1
        self._write_lock = asyncio.Lock()
        self._reading: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        self.closed_callback: Callable[[], None] | None = None

    @classmethod
    async def open(cls, connect: Callable[[], Awaitable[Streams]], name: str) -> Channel:
        """Connect and sync; ``ExecUnavailable`` if no helper answers in ``SYNC_TIMEOUT``."""
        streams = await connect()
        channel = cls(streams, name)
        try:
            await asyncio.wait_for(channel._sync(), SYNC_TIMEOUT)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            await channel.close()
            raise ExecUnavailable(
                f"no goldclone helper answered in {name}'s guest within {SYNC_TIMEOUT:g} s: the "
                "image has none, or it has not started (docs/api.md, Exec)"
            ) from None
        channel._reading = asyncio.create_task(channel._read(), name=f"channel-{name}")
        return channel

    async def _sync(self) -> None:
        nonce = secrets.token_hex(16).encode()
        self._writer.write(b"\n" + helper.SYNC + nonce + b"\n")
        await self._writer.drain()
        ready = helper.READY + nonce + b"\n"
        # line by line: bytes of an earlier connection before it are skipped in linear time
        while True:
            try:
                if (await self._reader.readuntil(b"\n")).endswith(ready):
                    return
            except asyncio.LimitOverrunError as too_long:
                await self._reader.readexactly(too_long.consumed)

    async def session(self, request: dict[str, Any]) -> Session:
        """Start ``request`` (the helper's ``OPEN``: ``argv``... or ``connect``)."""
        if self.closed.is_set():
            raise ExecFailed(f"the connection to {self._name}'s helper is closed")
        sid = self._next_sid
        self._next_sid += 1
        session = Session(self, sid)
        self._sessions[sid] = session
        await self.send(sid, helper.OPEN, json.dumps(request).encode())
        return session

    async def send(self, sid: int, kind: int, payload: bytes = b"") -> None:
        async with self._write_lock:
            if self.closed.is_set():
                raise ExecFailed(f"the connection to {self._name}'s helper is closed")
            self._writer.write(HEADER.pack(sid, kind, len(payload)) + payload)
            try:
                await self._writer.drain()
            except ConnectionError:
                await self.close()
                raise ExecFailed(f"the connection to {self._name}'s helper broke") from None

    def forget(self, sid: int) -> None:
        self._sessions.pop(sid, None)

    async def _read(self) -> None:
        try:
            while True:
                header = await self._reader.readexactly(HEADER.size)
                sid, kind, length = HEADER.unpack(header)
                if length > MAX_PAYLOAD:
                    log.warning("%s's helper sent a frame of %d bytes; closing", self._name, length)
                    return
                payload = await self._reader.readexactly(length)
                session = self._sessions.get(sid)
                if session is not None:
                    session.deliver(kind, payload)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            await self.close()

    async def close(self) -> None:
        """End every session (each reads an ``ExecFailed``) and the connection."""
        if self.closed.is_set():
            return
        self.closed.set()
        if self.closed_callback is not None:
            self.closed_callback()
        for session in list(self._sessions.values()):
            session.lost(f"the connection to {self._name}'s helper ended (the VM stopped?)")
        self._sessions.clear()
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()
        if self._reading is not None and self._reading is not asyncio.current_task():
            self._reading.cancel()


class Session:
    """One command or guest connection on a ``Channel``. Read it with ``receive`` until an
    ``Exit``; its output keeps flowing only as ``consumed`` returns credit."""

    def __init__(self, channel: Channel, sid: int) -> None:
        self._channel = channel
        self._sid = sid
        self._inbox: asyncio.Queue[Output | Exit | ExecFailed] = asyncio.Queue()
        self._credit = WINDOW
        self._credit_changed = asyncio.Event()
        self._to_return = 0
        self._exited = False
        self.ended = False

    def deliver(self, kind: int, payload: bytes) -> None:
        if kind in (helper.STDOUT, helper.STDERR):
            self._inbox.put_nowait(Output(1 if kind == helper.STDOUT else 2, payload))
        elif kind == helper.CREDIT:
            self._credit += CREDIT_BODY.unpack(payload)[0]
            self._credit_changed.set()
        elif kind == helper.EXIT:
            result = json.loads(payload)
            self._inbox.put_nowait(
                Exit(result.get("exit_code"), result.get("signal"), result.get("error"))
            )
            self._channel.forget(self._sid)
            self._exited = True
            self._credit_changed.set()

    def lost(self, why: str) -> None:
        self._inbox.put_nowait(ExecFailed(why))
        self._credit_changed.set()

    async def receive(self) -> Output | Exit:
        """The next output, or how the session ended; raises ``ExecFailed`` if the helper
        went away first."""
        item = await self._inbox.get()
        if isinstance(item, ExecFailed):
            self.ended = True
            raise item
        if isinstance(item, Exit):
            self.ended = True
        return item

    async def consumed(self, count: int) -> None:
        """Return credit for ``count`` bytes of output handled, in batches."""
        self._to_return += count
        if self._to_return >= _CREDIT_BATCH and not self.ended:
            count, self._to_return = self._to_return, 0
            await self._channel.send(self._sid, helper.CREDIT, CREDIT_BODY.pack(count))

    async def write(self, data: bytes) -> None:
        """Send input (stdin, or to the guest port), waiting for credit as the guest uses it."""
        view = memoryview(data)
        while view:
            while self._credit <= 0:
                if self.ended or self._exited or self._channel.closed.is_set():
                    raise ExecFailed("the command ended before it took all its input")
                self._credit_changed.clear()
                await self._credit_changed.wait()
            chunk = view[: min(MAX_PAYLOAD, self._credit)]
            self._credit -= len(chunk)
            await self._channel.send(self._sid, helper.INPUT, bytes(chunk))
            view = view[len(chunk) :]

    async def end_input(self) -> None:
        await self._channel.send(self._sid, helper.INPUT)

    async def resize(self, rows: int, cols: int) -> None:
        await self._channel.send(self._sid, helper.RESIZE, _json({"rows": rows, "cols": cols}))

    async def signal(self, number: int) -> None:
        await self._channel.send(self._sid, helper.SIGNAL, _json({"signal": number}))

    async def collect(self, limit: int = 1 << 20) -> tuple[bytes, bytes, Exit]:
        """Read to the end: stdout and stderr (each up to ``limit`` bytes; what comes after
        is dropped), and how it ended."""
        outputs = {1: bytearray(), 2: bytearray()}
        while not isinstance(item := await self.receive(), Exit):
            outputs[item.stream] += item.data[: max(0, limit - len(outputs[item.stream]))]
            await self.consumed(len(item.data))
        return bytes(outputs[1]), bytes(outputs[2]), item

    async def close(self) -> None:
        """Forget the session; the helper kills what it still runs."""
        if self.ended:
            return
        self.ended = True
        self._channel.forget(self._sid)
        with contextlib.suppress(ExecFailed):
            await self._channel.send(self._sid, helper.CLOSE)


def _json(value: dict[str, int]) -> bytes:
    return json.dumps(value).encode()
