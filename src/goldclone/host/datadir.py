"""One service per data dir: an exclusive lock on ``<data dir>/goldclone.lock``, held for as
long as the service runs, with the holder's PID in the file for the message a second one
gets. The kernel drops the lock when the holder exits, even by ``kill -9``."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from goldclone.errors import DataDirInUse

LOCK_FILE = "goldclone.lock"


class DataDirLock:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.absolute()
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the data dir, or raise ``DataDirInUse`` naming the service that has it."""
        if self._fd is not None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirInUse(
                f"the data dir {self.data_dir} is in use by another goldclone service "
                f"(PID {holder}); stop that one first, or give this one another data dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
