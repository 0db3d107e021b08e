"""A blob's bytes handed from the thread that writes them as they arrive to the thread that
unpacks them, so that a layer is unpacked while it downloads: a bounded buffer, which holds
the download back while the unpacking is behind, and drops what comes after the unpacking
ended (its error is then the pull's, once the download has been checked)."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable

DEPTH = 4
"""Chunks (of about a MiB) that may wait between the download and the unpacking."""


class Aborted(Exception):
    """The download ended without its last byte: what was unpacked is of no use (never an
    answer: the pull unpacks the blob's file instead, or fails as its download did)."""


class BlobStream:
    def __init__(self) -> None:
        self._ready = threading.Condition()
        self._chunks: deque[bytes] = deque()
        self._buffer = b""
        self._end: bool | None = None
        """``None`` while the download runs; then whether it got its last byte."""
        self._gone = False

    def feed(self, chunk: bytes) -> None:
        """Another chunk (the download's thread); waits while the buffer is full."""
        with self._ready:
            self._ready.wait_for(lambda: len(self._chunks) < DEPTH or self._gone)
            if not self._gone:
                self._chunks.append(chunk)
                self._ready.notify_all()

    def finish(self, complete: bool) -> None:
        """The download ended, ``complete`` or not."""
        with self._ready:
            self._end = complete
            self._ready.notify_all()

    def read(self, size: int = -1, /) -> bytes:
        """Up to ``size`` bytes (the unpacking's thread); ``b""`` at the end; ``Aborted`` if
        the download did not get to it."""
        if not self._buffer:
            with self._ready:
                self._ready.wait_for(lambda: bool(self._chunks) or self._end is not None)
                if not self._chunks:
                    if not self._end:
                        raise Aborted("the layer's download stopped before its end")
                    return b""
                self._buffer = self._chunks.popleft()
                self._ready.notify_all()
        if 0 <= size < len(self._buffer):
            data, self._buffer = self._buffer[:size], self._buffer[size:]
        else:
            data, self._buffer = self._buffer, b""
        return data

    def leave(self) -> None:
        """The unpacking ended: what the download sends after is dropped."""
        with self._ready:
            self._gone = True
            self._chunks.clear()
            self._ready.notify_all()


async def in_own_thread(work: Callable[[], None], name: str) -> None:
    """``work()`` in a thread of its own, not the loop's shared pool: a reader that waits for
    a download must never hold a thread that the download's writes need."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if done.done():  # its awaiter was cancelled
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def run() -> None:
        error: BaseException | None = None
        try:
            work()
        except BaseException as exc:  # handed to the awaiting task as it is
            error = exc
        loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    await done
