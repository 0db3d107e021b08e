"""Writing a file so that nobody ever reads half of it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomically(path: Path, content: bytes | Callable[[BinaryIO], None], mode: int) -> None:
    """Write ``content`` (bytes, or a function that writes to the file) to ``path`` with
    permissions ``mode``, through a temporary file beside it that replaces ``path`` in one
    step; on failure, ``path`` is as it was and the temporary file is gone. Blocking."""
    partial = path.with_name(f".{path.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            if isinstance(content, bytes):
                out.write(content)
            else:
                content(out)
        os.chmod(partial, mode)  # whatever the umask took away
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
