"""Downloading an image package: streamed to a file and hashed on the way, off the event loop.

The package is fetched with ``Accept-Encoding: identity``, so that the hash is of the bytes the
server holds, and each chunk is hashed and written by a worker thread, so that a large download
never holds up the service's event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import httpx

from goldclone.errors import ChecksumMismatch, DownloadFailed, InsufficientSpace
from goldclone.image_spec import ImageSpec
from goldclone.models import DownloadProgress

CHUNK = 1 << 20


async def fetch(
    http: httpx.AsyncClient,
    spec: ImageSpec,
    dest: Path,
    timeout: float,
    reserve_bytes: int,
    on_start: Callable[[DownloadProgress], None],
) -> str:
    """Download ``spec`` to ``dest``, check its checksum, and return the package's sha256
    (hex), computed in the same pass: what a gold image is known by, whatever checksum its
    request gave.

    ``on_start`` gets the download's progress, which is updated as chunks arrive. A download
    that would leave less than ``reserve_bytes`` free on ``dest``'s disk is refused before it
    starts, when the server says how large it is.
    """
    assert spec.url and spec.checksum and spec.checksum_type  # a URL's spec, as its model checks
    digest = hashlib.new(spec.checksum_type)
    content = digest if spec.checksum_type == "sha256" else hashlib.sha256()
    try:
        async with http.stream(
            "GET", spec.url, timeout=httpx.Timeout(timeout),
            headers={"Accept-Encoding": "identity"},
        ) as response:  # fmt: skip
            if response.status_code != 200:
                raise DownloadFailed(f"GET {spec.url} answered HTTP {response.status_code}")
            total = response.headers.get("Content-Length")
            progress = DownloadProgress(
                bytes_done=0, bytes_total=int(total) if total and total.isdigit() else None
            )
            check_room(f"image {spec.key}", dest.parent, progress.bytes_total, reserve_bytes)
            on_start(progress)
            sink = Sink(dest, (digest,) if content is digest else (digest, content))
            try:
                async for chunk in response.aiter_raw(CHUNK):
                    await to_the_end(sink.write, chunk)
                    progress.bytes_done += len(chunk)
            finally:
                await to_the_end(sink.close)
    except httpx.TimeoutException:
        raise DownloadFailed(f"GET {spec.url} timed out (no data for {timeout:g} s)") from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise DownloadFailed(f"GET {spec.url} failed: {exc or type(exc).__name__}") from None
    actual = digest.hexdigest()
    if actual != spec.checksum.lower():
        raise ChecksumMismatch(
            f"the download's {spec.checksum_type} is {actual}, "
            f"but the request expects {spec.checksum.lower()}"
        )
    return content.hexdigest()


class Sink:
    """The download's file, hashed by each of ``digests`` as it is written (``append``: after
    what it holds, to resume) and handed to ``tap`` too; opened by the first write, in the
    worker thread that does it."""

    def __init__(
        self, path: Path, digests: tuple[Any, ...], append: bool = False,
        tap: Callable[[bytes], None] | None = None,
    ) -> None:  # fmt: skip
        self._path, self._digests, self._tap = path, digests, tap
        self._mode = "ab" if append else "wb"
        self._file: IO[bytes] | None = None

    def write(self, chunk: bytes) -> None:
        if self._file is None:
            self._file = self._path.open(self._mode)
        for digest in self._digests:
            digest.update(chunk)
        self._file.write(chunk)
        if self._tap is not None:
            self._tap(chunk)

    def close(self) -> None:
        if self._file is None:
            self._file = self._path.open(self._mode)  # an empty download is an empty file
        self._file.close()


async def to_the_end(func: Callable[..., None], *args: Any) -> None:
    """``func(*args)`` in a worker thread, always to its end: a cancel waits for it before it
    is raised, since the thread runs on regardless and would race the caller's cleanup (a
    close of the file it writes)."""
    job = asyncio.ensure_future(asyncio.to_thread(func, *args))
    try:
        await asyncio.shield(job)
    except asyncio.CancelledError:
        await asyncio.gather(job, return_exceptions=True)
        raise


def check_room(name: str, folder: Path, size: int | None, reserve_bytes: int) -> None:
    """Refuse a download that cannot fit, with the reserve kept free, before it starts."""
    if size is None:
        return
    usage = shutil.disk_usage(folder)
    if size + reserve_bytes > usage.free:
        raise InsufficientSpace(
            f"{name} is {size} bytes, and {usage.free} bytes are free on the "
            f"data dir's disk, {reserve_bytes} of which are kept in reserve (for the host, "
            f"and for what the running VMs' disks can still grow into)"
        )
