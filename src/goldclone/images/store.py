"""The gold image cache: download once per checksum, verify while streaming, unpack, keep.

A gold image lives at ``images/<type>-<checksum>/`` and exists only once it is complete:
the package is downloaded to ``downloads/``, unpacked into a temporary folder beside the
cache and renamed into place, so a half-made gold image is never seen. Creates for the same
image share one download.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from goldclone.errors import ChecksumMismatch, DownloadFailed
from goldclone.images.archive import UnpackLimits, unpack
from goldclone.images.diskcheck import DiskImage, inspect_package
from goldclone.models import ImageSpec

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_METADATA = "gold.json"


@dataclass(frozen=True)
class GoldImage:
    key: str
    root: Path
    disk: DiskImage
    vmx: Path | None


class ImageStore:
    """Makes and finds gold images under ``data_dir``."""

    def __init__(
        self,
        data_dir: Path,
        http: httpx.AsyncClient,
        download_timeout: float = 30.0,
        limits: UnpackLimits | None = None,
    ) -> None:
        self._images = data_dir.absolute() / "images"
        self._downloads = data_dir.absolute() / "downloads"
        self._http = http
        self._timeout = download_timeout
        self._limits = limits or UnpackLimits()
        self._inflight: dict[str, asyncio.Task[GoldImage]] = {}

    def open(self) -> None:
        """Create the folders and drop what a crash may have left half-made."""
        for folder in (self._images, self._downloads):
            folder.mkdir(parents=True, exist_ok=True)
        for partial in self._downloads.iterdir():
            _remove(partial)
        for partial in self._images.glob(".tmp-*"):
            _remove(partial)

    def gold_dir(self, spec: ImageSpec) -> Path:
        return self._images / spec.key

    def cached(self, spec: ImageSpec) -> GoldImage | None:
        """The gold image for ``spec`` if it is complete on disk."""
        root = self.gold_dir(spec)
        try:
            meta = json.loads((root / _METADATA).read_text())
        except FileNotFoundError:
            return None
        vmx = root / meta["vmx"] if meta.get("vmx") else None
        return GoldImage(spec.key, root, DiskImage(root / meta["disk"], meta["format"]), vmx)

    async def ensure(self, spec: ImageSpec, on_fetch: Callable[[], Awaitable[None]]) -> GoldImage:
        """Return the gold image for ``spec``, fetching it first unless it is cached.

        ``on_fetch`` is called when this caller has to wait for a download (its own or a
        shared one). Cancelling one caller does not cancel a download that others share.
        """
        gold = self.cached(spec)
        if gold is not None:
            return gold
        await on_fetch()
        task = self._inflight.get(spec.key)
        if task is None:
            task = asyncio.create_task(self._fetch(spec), name=f"fetch {spec.key}")
            self._inflight[spec.key] = task
            task.add_done_callback(lambda _: self._inflight.pop(spec.key, None))
        return await asyncio.shield(task)

    async def _fetch(self, spec: ImageSpec) -> GoldImage:
        download = self._downloads / f"{spec.key}.{uuid.uuid4().hex}.part"
        staging = self._images / f".tmp-{spec.key}-{uuid.uuid4().hex}"
        try:
            await self._download(spec, download)
            staging.mkdir()
            await asyncio.to_thread(self._unpack, download, staging)
            _remove(download)
            await asyncio.to_thread(_make_read_only, staging)
            staging.rename(self.gold_dir(spec))
        finally:
            _remove(download)
            _remove(staging)
        gold = self.cached(spec)
        assert gold is not None
        log.info("gold image %s is ready", spec.key)
        return gold

    async def _download(self, spec: ImageSpec, dest: Path) -> None:
        digest = hashlib.new(spec.checksum_type)
        timeout = httpx.Timeout(self._timeout)
        try:
            async with self._http.stream(
                "GET", spec.url, timeout=timeout, headers={"Accept-Encoding": "identity"}
            ) as response:
                if response.status_code != 200:
                    raise DownloadFailed(f"GET {spec.url} answered HTTP {response.status_code}")
                with dest.open("wb") as out:
                    async for chunk in response.aiter_raw(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
        except httpx.TimeoutException:
            raise DownloadFailed(
                f"GET {spec.url} timed out (no data for {self._timeout:g} s)"
            ) from None
        except httpx.HTTPError as exc:
            raise DownloadFailed(f"GET {spec.url} failed: {exc or type(exc).__name__}") from None
        actual = digest.hexdigest()
        if actual != spec.checksum.lower():
            raise ChecksumMismatch(
                f"the download's {spec.checksum_type} is {actual}, "
                f"but the request expects {spec.checksum.lower()}"
            )

    def _unpack(self, package: Path, staging: Path) -> None:
        content = staging / "content"
        content.mkdir()
        unpack(package, content, self._limits)
        found = inspect_package(content)
        meta = {
            "disk": str(found.disk.path.relative_to(staging)),
            "format": found.disk.format,
            "vmx": str(found.vmx.relative_to(staging)) if found.vmx else None,
        }
        (staging / _METADATA).write_text(json.dumps(meta))


def _make_read_only(root: Path) -> None:
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            os.chmod(os.path.join(folder, name), 0o444)
        os.chmod(folder, 0o555)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
