"""A VM's serial console as text: the last MiB of what the guest wrote, and what it writes
next, with control characters other than line breaks and tabs removed."""

from __future__ import annotations

import asyncio
import codecs
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

TAIL_BYTES = 1 << 20
FOLLOW_POLL = 0.2
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` without control characters; ``\\r\\n`` becomes ``\\n``, tabs stay."""
    return _CONTROL.sub("", text.replace("\r\n", "\n"))


async def read(
    path: Path, follow: bool, still_there: Callable[[], Awaitable[bool]]
) -> AsyncIterator[str]:
    """The console at ``path``: its last ``TAIL_BYTES``, then, with ``follow``, what is
    appended, until ``still_there()`` says the VM is gone or the file goes."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    offset, data = await asyncio.to_thread(_tail, path)
    yield printable(decoder.decode(data))
    while follow and await still_there():
        await asyncio.sleep(FOLLOW_POLL)
        try:
            offset, data = await asyncio.to_thread(_read_from, path, offset)
        except FileNotFoundError:
            break
        if data:
            yield printable(decoder.decode(data))
    yield printable(decoder.decode(b"", final=True))


def _tail(path: Path) -> tuple[int, bytes]:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0, b""
    return _read_from(path, max(0, size - TAIL_BYTES))


def _read_from(path: Path, offset: int) -> tuple[int, bytes]:
    """The bytes of ``path`` from ``offset`` on (at most ``TAIL_BYTES`` at a time), and the
    offset after them."""
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < offset:
            offset = 0  # the file was rewritten
        f.seek(offset)
        data = f.read(TAIL_BYTES)
    return offset + len(data), data
