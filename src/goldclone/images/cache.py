"""The gold image cache: download once per checksum, verify while streaming, unpack, keep.

A gold image lives at ``images/<type>-<checksum>/`` and exists only once it is complete:
the package is downloaded to ``downloads/``, unpacked into a temporary folder beside the
cache and renamed into place, so a half-made gold image is never seen. Creates for the same
image share one download.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import shutil
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import httpx

from goldclone.errors import (
    ImageInUse,
    ImageNotFound,
    InsufficientSpace,
    VMFailure,
)
from goldclone.images.checks import DiskImage, inspect_package
from goldclone.images.download import fetch
from goldclone.images.unpack import UnpackLimits, unpack
from goldclone.models import (
    DownloadProgress,
    ErrorBody,
    Image,
    ImageSpec,
    ImageStatus,
    rfc3339_ms,
)

log = logging.getLogger(__name__)

_METADATA = "gold.json"
GOLD_FORMAT = 2
"""The format of ``gold.json``: 1 had no version (up to commit 8682a97); 2 says so."""


@dataclass(frozen=True)
class GoldImage:
    key: str
    root: Path
    disk: DiskImage
    vmx: Path | None


class ImageCache:
    """Makes and finds gold images under ``data_dir``."""

    def __init__(
        self,
        data_dir: Path,
        http: httpx.AsyncClient,
        download_timeout: float = 30.0,
        limits: UnpackLimits | None = None,
        reserve_bytes: int = 0,
    ) -> None:
        self._images = data_dir.absolute() / "images"
        self._uses = data_dir.absolute() / "last-used"
        self._downloads = data_dir.absolute() / "downloads"
        self._http = http
        self._timeout = download_timeout
        self._limits = limits or UnpackLimits()
        self._reserve_bytes = reserve_bytes
        self._inflight: dict[str, asyncio.Task[GoldImage]] = {}
        self._specs: dict[str, ImageSpec] = {}
        self._progress: dict[str, DownloadProgress] = {}
        self._failures: dict[str, VMFailure] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.on_change: Callable[[Image, bool], None] | None = None
        """Told of each image that starts or ends a fetch, and of each deleted one (``True``)."""

    async def open(self) -> None:
        """Create the folders and drop what a crash may have left half-made."""
        await asyncio.to_thread(self._clean)

    def _clean(self) -> None:
        for folder in (self._images, self._downloads, self._uses):
            folder.mkdir(parents=True, exist_ok=True)
        for partial in [*self._downloads.iterdir(), *self._images.glob(".tmp-*")]:
            _remove(partial)
        for root in self._images.glob("*-*"):
            _upgrade_metadata(root)

    def lock(self, key: str) -> asyncio.Lock:
        """Held while a clone is made from the image ``key``, and while it is deleted."""
        return self._locks.setdefault(key, asyncio.Lock())

    async def close(self) -> None:
        """Stop the downloads under way; their partial files go at the next ``open``."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def gold_dir(self, spec: ImageSpec) -> Path:
        return self._images / spec.key

    def cached(self, spec: ImageSpec) -> GoldImage | None:
        """The gold image for ``spec`` if it is complete on disk."""
        root = self.gold_dir(spec)
        meta = _read_metadata(root)
        if meta is None:
            return None
        vmx = root / meta["vmx"] if meta.get("vmx") else None
        return GoldImage(spec.key, root, DiskImage(root / meta["disk"], meta["format"]), vmx)

    async def ensure(
        self, spec: ImageSpec, on_fetch: Callable[[], Awaitable[None]] | None = None
    ) -> GoldImage:
        """Return the gold image for ``spec``, fetching it first unless it is cached.

        ``on_fetch`` is called when this caller has to wait for a download (its own or a
        shared one). Cancelling one caller does not cancel a download that others share.
        """
        gold = self.cached(spec)
        if gold is None:
            if on_fetch is not None:
                await on_fetch()
            gold = self.cached(spec)  # a shared fetch may have finished while on_fetch ran
        if gold is None:
            gold = await asyncio.shield(self._fetch_task(spec))
        await asyncio.to_thread(self._used, spec.key)
        return gold

    def _used(self, key: str) -> None:
        """Mark the image as used now: the mtime of its file in ``last-used/``."""
        (self._uses / key).touch()

    def prefetch(self, spec: ImageSpec) -> None:
        """Start fetching ``spec`` unless it is cached or already on its way."""
        if self.cached(spec) is None:
            self._fetch_task(spec)

    def _fetch_task(self, spec: ImageSpec) -> asyncio.Task[GoldImage]:
        """The one fetch of ``spec`` under way, started if there is none."""
        task = self._inflight.get(spec.key)
        if task is None:
            task = asyncio.create_task(self._fetch(spec), name=f"fetch {spec.key}")
            self._inflight[spec.key] = task
            self._specs[spec.key] = spec
            self._failures.pop(spec.key, None)
            task.add_done_callback(lambda done: self._fetched(spec.key, done))
            self._changed(spec.key)
        return task

    def _fetched(self, key: str, task: asyncio.Task[GoldImage]) -> None:
        self._inflight.pop(key, None)
        self._progress.pop(key, None)
        if not task.cancelled() and isinstance(task.exception(), VMFailure):
            self._failures[key] = cast(VMFailure, task.exception())
        self._changed(key)

    def _changed(self, key: str, last: Image | None = None) -> None:
        image = last or self.image(key)
        if self.on_change is not None and image is not None:
            self.on_change(image, last is not None)

    def progress(self, spec: ImageSpec) -> DownloadProgress | None:
        """How far the download of ``spec`` has come, while it runs."""
        return self._progress.get(spec.key)

    def images(self) -> list[Image]:
        """Every gold image on disk, being fetched, or whose last fetch failed."""
        on_disk = {root.name for root in self._images.glob("*-*") if not root.name.startswith(".")}
        found = (self.image(key) for key in sorted(on_disk | self._specs.keys()))
        return [image for image in found if image is not None]

    def image(self, key: str) -> Image | None:
        """The gold image ``key`` (``<type>-<checksum>``), if it is on disk, being fetched,
        or failed at its last fetch."""
        meta = _read_metadata(self._images / key) if not key.startswith(".") else None
        if meta is not None:
            kind, checksum = key.split("-", 1)
            return Image.model_validate({
                "id": key, "checksum": checksum, "checksum_type": kind,
                "url": meta["url"], "status": ImageStatus.READY,
                "size_bytes": meta["size_bytes"], "last_used_at": self._last_use(key),
            })  # fmt: skip
        spec, failure = self._specs.get(key), self._failures.get(key)
        if spec is None or (key not in self._inflight and failure is None):
            return None
        if key in self._inflight:
            status, error = ImageStatus.DOWNLOADING, None
        else:
            assert failure is not None
            status, error = ImageStatus.ERROR, ErrorBody(code=failure.code, message=failure.message)
        return Image(
            id=key, checksum=spec.checksum.lower(), checksum_type=spec.checksum_type,
            url=spec.url, status=status, progress=self._progress.get(key), error=error,
        )  # fmt: skip

    def _last_use(self, key: str) -> str | None:
        try:
            used = (self._uses / key).stat().st_mtime
        except FileNotFoundError:
            return None
        return rfc3339_ms(datetime.fromtimestamp(used, UTC))

    async def delete(self, key: str) -> None:
        """Remove the gold image ``key``. The caller makes sure that no VM uses it.

        It is renamed out of the way first, so it is gone at once and never seen half-removed.
        """
        if key in self._inflight:
            raise ImageInUse(f"image {key} is being downloaded")
        last = self.image(key)
        root = self._images / key
        if key.startswith(".") or "/" in key or not root.is_dir():
            if self._failures.pop(key, None) is None:
                raise ImageNotFound(f"there is no image {key}")
            self._specs.pop(key, None)  # a failed fetch: deleting forgets it
            self._changed(key, last)
            return
        doomed = self._images / f".tmp-deleted-{key}-{uuid.uuid4().hex}"
        root.rename(doomed)
        await asyncio.to_thread(_remove, doomed)
        self._specs.pop(key, None)
        (self._uses / key).unlink(missing_ok=True)
        self._changed(key, last)
        log.info("gold image %s deleted", key)

    async def _fetch(self, spec: ImageSpec) -> GoldImage:
        download = self._downloads / f"{spec.key}.{uuid.uuid4().hex}.part"
        staging = self._images / f".tmp-{spec.key}-{uuid.uuid4().hex}"
        try:
            await fetch(
                self._http, spec, download, self._timeout, self._reserve_bytes,
                on_start=lambda progress: self._progress.__setitem__(spec.key, progress),
            )  # fmt: skip
            staging.mkdir()
            await asyncio.to_thread(self._unpack, download, staging, spec.url)
            await asyncio.to_thread(_remove, download)
            await asyncio.to_thread(_make_read_only, staging)
            staging.rename(self.gold_dir(spec))
            self._used(spec.key)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            raise InsufficientSpace(
                f"the disk filled up while image {spec.key} was being fetched; "
                "everything of it was removed"
            ) from None
        finally:
            await asyncio.to_thread(_remove, download)
            await asyncio.to_thread(_remove, staging)
        gold = self.cached(spec)
        assert gold is not None
        log.info("gold image %s is ready", spec.key)
        return gold

    def _unpack(self, package: Path, staging: Path, url: str) -> None:
        content = staging / "content"
        content.mkdir()
        unpack(package, content, self._limits)
        found = inspect_package(content)
        meta = {
            "version": GOLD_FORMAT,
            "url": url,
            "size_bytes": _disk_usage(content),
            "disk": str(found.disk.path.relative_to(staging)),
            "format": found.disk.format,
            "vmx": str(found.vmx.relative_to(staging)) if found.vmx else None,
        }
        (staging / _METADATA).write_text(json.dumps(meta))


def _read_metadata(root: Path) -> dict[str, Any] | None:
    """A gold image's ``gold.json``; ``None`` unless the image is complete and of a format
    that this code reads."""
    try:
        meta: dict[str, Any] = json.loads((root / _METADATA).read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    return meta if meta.get("version") == GOLD_FORMAT else None


def _upgrade_metadata(root: Path) -> None:
    """Bring the ``gold.json`` of an image made by earlier code to ``GOLD_FORMAT``, in one
    rename, deriving what it lacks; one made by newer code is left alone."""
    try:
        meta: dict[str, Any] = json.loads((root / _METADATA).read_text())
    except (OSError, ValueError):
        return
    version = meta.get("version", 1)
    if version == GOLD_FORMAT:
        return
    if not isinstance(version, int) or version > GOLD_FORMAT:
        log.warning("gold image %s is of format %s, newer than this code's; not used",
                    root.name, version)  # fmt: skip
        return
    # Format 1 (up to commit 8682a97): no version; before 2a3b13e, no url or size either.
    meta |= {"version": GOLD_FORMAT}
    meta.setdefault("url", "")
    meta.setdefault("size_bytes", _disk_usage(root / "content"))
    partial = root / f".{_METADATA}.new"
    os.chmod(root, 0o755)
    try:
        partial.write_text(json.dumps(meta))
        os.chmod(partial, 0o444)
        os.replace(partial, root / _METADATA)
    finally:
        partial.unlink(missing_ok=True)
        os.chmod(root, 0o555)
    log.info("gold image %s: gold.json upgraded from format %d to %d",
             root.name, version, GOLD_FORMAT)  # fmt: skip


def _disk_usage(root: Path) -> int:
    """The space the files under ``root`` take on disk, computed once when it is published."""
    return sum(
        os.lstat(os.path.join(folder, name)).st_blocks * 512
        for folder, _, files in os.walk(root)
        for name in files
    )


def _make_writable(root: Path) -> None:
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o644)


def _make_read_only(root: Path) -> None:
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            os.chmod(os.path.join(folder, name), 0o444)
        os.chmod(folder, 0o555)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        _make_writable(path)  # a gold image's read-only folders stop a non-root owner
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
