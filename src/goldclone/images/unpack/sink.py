"""A file's bytes hashed and written in a thread of their own, so that the thread that
inflates a package never waits for the hashing or the disk: a bounded queue between them."""

from __future__ import annotations

import os
import queue
import threading
from types import TracebackType
from typing import Any

DEPTH = 4
"""Chunks that may wait to be written."""


class Sink:
    """Writes what ``put`` is given to ``fd`` (leaving holes for whole chunks of zeros, the
    size of ``zeros``) and updates ``digest`` with it; ``close`` waits for the last write and
    raises the first error that the writing met."""

    def __init__(self, fd: int, digest: Any, zeros: bytes) -> None:
        self._fd = fd
        self._digest = digest
        self._zeros = zeros
        self._queue: queue.Queue[bytes | None] = queue.Queue(DEPTH)
        self._error: BaseException | None = None
        self._size = 0
        self._ends_in_hole = False
        self._thread = threading.Thread(target=self._run, name="unpack sink", daemon=True)
        self._thread.start()

    def put(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(chunk)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._ends_in_hole:
            os.ftruncate(self._fd, self._size)

    def __enter__(self) -> Sink:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if kind is None:
            self.close()
            return
        self._error = self._error or error  # the writer drops the rest: the reader failed
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if self._error is not None:
                continue  # drained, so that a put never blocks on a writer that stopped
            try:
                self._write(chunk)
            except BaseException as exc:  # raised in the reader's thread, by put or close
                self._error = exc

    def _write(self, chunk: bytes) -> None:
        if self._digest is not None:
            self._digest.update(chunk)
        self._size += len(chunk)
        self._ends_in_hole = chunk == self._zeros
        if self._ends_in_hole:
            os.lseek(self._fd, len(chunk), os.SEEK_CUR)
            return
        view = memoryview(chunk)
        while view:
            view = view[os.write(self._fd, view) :]
