"""The bytes of a tar package as ``tarfile``'s stream mode reads them: plain, or decompressed
from gzip or bzip2 a bounded piece at a time, with a budget for header data."""

from __future__ import annotations

import bz2
from typing import Literal, Protocol, cast

from isal import isal_zlib

from goldclone.errors import ImageUnsafe, ImageUnsupported
from goldclone.images.unpack.writer import CHUNK

_INPUT_CHUNK = 256 << 10
GZIP_MAGIC = b"\x1f\x8b"
BZIP2_MAGIC = b"BZh"
Compression = Literal["gzip", "bzip2"]
_INFLATE_ERROR = cast(type[Exception], isal_zlib.error)  # its stub calls it an instance


class Readable(Protocol):
    """Where the bytes come from: a file, or a download as it arrives."""

    def read(self, size: int = -1, /) -> bytes: ...


def open_source(f: Readable, compression: Compression | None) -> Source:
    if compression == "gzip":
        return _GzipSource(f)
    if compression == "bzip2":
        return _Bzip2Source(f)
    return Source(f)


class Source:
    """A forward-only stream of tar bytes for ``tarfile``'s stream mode.

    While ``budget`` is set, reading more than that many bytes raises ``ImageUnsafe``: the
    tar loop sets it while tarfile reads headers, which it would otherwise buffer whole.
    """

    def __init__(self, f: Readable) -> None:
        self._f = f
        self._pos = 0
        self.budget: int | None = None
        self.after = ""  # the last member read, for messages

    def read(self, size: int = -1, /) -> bytes:
        if size == 0:
            return b""  # zlib would take a limit of 0 as no limit at all
        data = self._read(CHUNK if size < 0 else size)
        self._pos += len(data)
        if self.budget is not None:
            self.budget -= len(data)
            if self.budget < 0:
                where = f"after member {self.after!r}" if self.after else "at its start"
                raise ImageUnsafe(f"the tar archive has oversized header data {where}")
        return data

    def _read(self, size: int) -> bytes:
        return self._f.read(size)

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, /) -> int:
        raise OSError("the package is read as a stream")

    def write(self, data: bytes, /) -> int:
        raise OSError("the package is read-only")

    def close(self) -> None:
        pass


class _CompressedSource(Source):
    """Decompresses one or more concatenated streams, never more than asked at a time."""

    _label = ""
    _magic = b""

    def __init__(self, f: Readable) -> None:
        super().__init__(f)
        self._pending = b""
        self._done = False
        self._start()

    def _read(self, size: int) -> bytes:
        while not self._done:
            if self._at_eof():
                self._next_stream()
                continue
            data, self._pending = self._pending, b""
            if not data and self._wants_input():
                data = self._f.read(_INPUT_CHUNK)
                if not data:
                    raise ImageUnsupported(f"the {self._label} stream is truncated")
            out = self._inflate(data, size)
            if out:
                return out
        return b""

    def _next_stream(self) -> None:
        rest = self._unused()
        if len(rest) < len(self._magic):
            rest += self._f.read(_INPUT_CHUNK)
        if rest.startswith(self._magic):
            self._start()
            self._pending = rest
        else:
            # Like gzip and GNU tar, ignore zero padding or garbage after the last stream.
            self._done = True

    def _start(self) -> None:
        raise NotImplementedError

    def _at_eof(self) -> bool:
        raise NotImplementedError

    def _wants_input(self) -> bool:
        raise NotImplementedError

    def _inflate(self, data: bytes, size: int) -> bytes:
        raise NotImplementedError

    def _unused(self) -> bytes:
        raise NotImplementedError


class _GzipSource(_CompressedSource):
    _label = "gzip"
    _magic = GZIP_MAGIC

    def _start(self) -> None:
        self._d = isal_zlib.decompressobj(wbits=31)  # ISA-L's inflate: zlib's, faster
        self._full = False

    def _at_eof(self) -> bool:
        return self._d.eof

    def _wants_input(self) -> bool:
        # After a call that filled its output, zlib may hold more without new input.
        return not self._full

    def _inflate(self, data: bytes, size: int) -> bytes:
        try:
            out = self._d.decompress(data, size)
        except _INFLATE_ERROR as exc:
            raise ImageUnsupported(f"the gzip data is damaged: {exc}") from None
        self._pending = self._d.unconsumed_tail
        self._full = len(out) == size
        return out

    def _unused(self) -> bytes:
        return self._d.unused_data


class _Bzip2Source(_CompressedSource):
    _label = "bzip2"
    _magic = BZIP2_MAGIC

    def _start(self) -> None:
        self._d = bz2.BZ2Decompressor()

    def _at_eof(self) -> bool:
        return self._d.eof

    def _wants_input(self) -> bool:
        return self._d.needs_input

    def _inflate(self, data: bytes, size: int) -> bytes:
        try:
            return self._d.decompress(data, size)
        except (OSError, EOFError) as exc:
            raise ImageUnsupported(f"the bzip2 data is damaged: {exc}") from None

    def _unused(self) -> bytes:
        return self._d.unused_data
