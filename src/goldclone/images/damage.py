"""The boundary between hostile bytes and the service: whatever reading a damaged package
raises is ``ImageUnsupported``, never an internal error."""

from __future__ import annotations

import contextlib
import errno
import logging
import lzma
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterator

from goldclone.errors import GoldcloneError, ImageUnsupported

log = logging.getLogger(__name__)

_OUT_OF_SPACE = {errno.ENOSPC, errno.EDQUOT}
# What the standard library's readers raise on bytes they cannot make sense of: bad offsets
# (OSError from a negative seek, OverflowError), short reads, bad lengths, bad tables.
_DAMAGE = (
    OSError,
    ValueError,
    EOFError,
    LookupError,
    ArithmeticError,
    NotImplementedError,
    RuntimeError,
    struct.error,
    zlib.error,
    lzma.LZMAError,
    zipfile.BadZipFile,
    tarfile.TarError,
)


@contextlib.contextmanager
def read_as_package(what: str) -> Iterator[None]:
    """Map what reading ``what`` raises to ``ImageUnsupported``; our own errors, and a disk
    that filled up (the caller's ``insufficient-space``), pass through."""
    try:
        yield
    except GoldcloneError:
        raise
    except _DAMAGE as exc:
        if isinstance(exc, OSError) and exc.errno in _OUT_OF_SPACE:
            raise
        log.info("%s is damaged: %s: %s", what, type(exc).__name__, exc)
        raise ImageUnsupported(f"{what} is damaged: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror  # without the file name, which is a path on the host
    return str(exc) or type(exc).__name__
