"""Making the members of a package on disk: only regular files (0644) and folders (0755),
under plainly relative names, within the member and byte limits, sparse where the data is
zeros."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from goldclone.errors import ImageUnsafe, ImageUnsupported
from goldclone.images.unpack.sink import Sink

CHUNK = 1 << 20
_ZEROS = bytes(CHUNK)
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class UnpackLimits:
    """How much a package may unpack to: total bytes of file data, and number of members."""

    max_total_bytes: int = 64 << 30
    max_members: int = 10_000


class Writer:
    """Creates the members of a package under ``dest``, enforcing names and limits."""

    def __init__(self, dest: Path, limits: UnpackLimits, hashed: bool = False) -> None:
        self.root = dest
        self._dest = dest
        self.limits = limits
        self.sha256: dict[Path, str] | None = {} if hashed else None
        """With ``hashed``: each file written, with the sha256 of its bytes."""
        self._members = 0
        self._bytes = 0
        self._is_dir: dict[tuple[str, ...], bool] = {}  # every path made, explicit or not
        self._explicit: set[tuple[str, ...]] = set()

    def count_member(self, name: str) -> None:
        self._members += 1
        if self._members > self.limits.max_members:
            raise ImageUnsafe(
                f"the package has more than {self.limits.max_members} members (stopped at {name!r})"
            )

    def make_dir(self, name: str) -> None:
        parts = self._claim(name, is_dir=True)
        if parts and not self._is_dir.get(parts):
            os.mkdir(self._dest.joinpath(*parts), 0o755)
            self._is_dir[parts] = True

    def write_file(self, name: str, read: Callable[[int], bytes]) -> None:
        parts = self._claim(name, is_dir=False)
        if not parts:
            raise ImageUnsafe(f"member {name!r} has an empty name")
        self._is_dir[parts] = False
        path = self._dest.joinpath(*parts)
        fd = os.open(path, _FILE_FLAGS, 0o644)
        digest = hashlib.sha256() if self.sha256 is not None else None
        try:
            self._copy(fd, read, name, digest)
        finally:
            os.close(fd)
        if self.sha256 is not None and digest is not None:
            self.sha256[path] = digest.hexdigest()

    def _claim(self, name: str, *, is_dir: bool) -> tuple[str, ...]:
        parts = safe_parts(name)
        for depth in range(1, len(parts)):
            parent = parts[:depth]
            parent_is_dir = self._is_dir.get(parent)
            if parent_is_dir is False:
                raise ImageUnsafe(f"member {name!r} lies inside a file of the package")
            if parent_is_dir is None:
                os.mkdir(self._dest.joinpath(*parent), 0o755)
                self._is_dir[parent] = True
        if parts in self._is_dir and self._is_dir[parts] != is_dir:
            raise ImageUnsafe(f"member {name!r} is both a file and a directory")
        if parts in self._explicit:
            raise ImageUnsafe(f"member {name!r} appears more than once in the package")
        if parts:
            self._explicit.add(parts)
        return parts

    def _copy(self, fd: int, read: Callable[[int], bytes], name: str, digest: Any) -> None:
        with Sink(fd, digest, _ZEROS) as sink:
            while chunk := read(CHUNK):
                self._count_bytes(len(chunk), name)
                sink.put(chunk)

    def _count_bytes(self, count: int, name: str) -> None:
        self._bytes += count
        if self._bytes > self.limits.max_total_bytes:
            raise ImageUnsafe(
                f"the package unpacks to more than {self.limits.max_total_bytes} bytes "
                f"(stopped in member {name!r})"
            )


def safe_parts(name: str) -> tuple[str, ...]:
    """Split a member name into path components, rejecting any that is not plainly relative."""
    if "\x00" in name:
        raise ImageUnsafe(f"member {name!r} has a NUL byte in its name")
    if "\\" in name:
        raise ImageUnsafe(f"member {name!r} has a backslash in its name")
    if any(ord(c) < 0x20 or c == "\x7f" for c in name):
        raise ImageUnsafe(f"member {name!r} has a control character in its name")
    if name.startswith("/"):
        raise ImageUnsafe(f"member {name!r} has an absolute path")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise ImageUnsafe(f"member {name!r} has a '..' component in its path")
    if any(len(os.fsencode(part)) > 255 for part in parts):
        raise ImageUnsupported(f"member {name!r} has a name component over 255 bytes")
    return parts
