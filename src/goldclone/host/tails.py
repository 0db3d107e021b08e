"""Keeping an append-only file, which another process writes, to its last bytes: a guest's
console log, which the guest can write as fast as it likes.

The writer must open the file with ``O_APPEND`` (QEMU's ``append=on``), so that whatever it
writes goes at the end, wherever the end is now. The oldest bytes are dropped in place with
``fallocate(FALLOC_FL_COLLAPSE_RANGE)`` (ext4 and XFS), which the writer cannot race; where
the filesystem lacks it, the tail is copied to the start and the file cut after it, which
loses what the writer appends meanwhile.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from pathlib import Path

FALLOC_FL_COLLAPSE_RANGE = 0x08
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def keep_tail(path: Path, most: int) -> bool:
    """If ``path`` holds more than ``most`` bytes, drop its oldest ones until it holds about
    half of that; return whether it was cut. A missing file is fine. Blocking."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        stat = os.fstat(fd)
        if stat.st_size <= most:
            return False
        block = max(stat.st_blksize, 4096)
        drop = (stat.st_size - most // 2) // block * block
        if drop <= 0:
            return False
        if _libc.fallocate(fd, FALLOC_FL_COLLAPSE_RANGE, 0, drop) == 0:
            return True
        if ctypes.get_errno() not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(path))
        tail = os.pread(fd, stat.st_size - drop, drop)
        os.pwrite(fd, tail, 0)
        os.ftruncate(fd, len(tail))
        return True
    finally:
        os.close(fd)


def read_end(path: Path, size: int) -> bytes | None:
    """The last ``size`` bytes of ``path``; ``None`` if there is no such file. Blocking."""
    try:
        with path.open("rb") as file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - size))
            return file.read()
    except FileNotFoundError:
        return None
