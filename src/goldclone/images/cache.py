"""The gold image cache: download once per package, verify while streaming, unpack, keep.

A gold image lives at ``images/<type>-<checksum>/`` (the checksum it was first fetched by)
and exists only once it is complete: the package is downloaded to ``downloads/``, unpacked
into a temporary folder beside the cache and renamed into place, so a half-made gold image is
never seen. Creates for the same image share one download.

A gold image is its package's content: every download is also hashed with sha256, which
``gold.json`` keeps. A download under a checksum not known yet whose package is one that a
gold image has already is not unpacked again: its checksum is remembered (in the
``ChecksumBook``) as another name of that image, and later requests with it find the image
at once.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, cast

import httpx

from goldclone.errors import (
    ImageInUse,
    ImageNotFound,
    InsufficientSpace,
    VMFailure,
)
from goldclone.images.checks import DiskImage, inspect_package
from goldclone.images.download import fetch
from goldclone.images.gold import (
    GOLD_FORMAT,
    METADATA,
    GoldImage,
    content_of,
    disk_usage,
    make_read_only,
    read_metadata,
    remove,
    upgrade_metadata,
)
from goldclone.images.unpack import UnpackLimits, unpack
from goldclone.models import DownloadProgress, ErrorBody, Image, ImageSpec, ImageStatus

log = logging.getLogger(__name__)

FAILED_KEPT = 3600.0
"""Seconds that a failed fetch stays listed, with its error, unless the image is asked for
again or deleted before: then it is forgotten, as a delete would."""


class ChecksumBook(Protocol):
    """Where the checksums verified against image packages are kept (the store): each as its
    name, ``<type>-<checksum>``, with the sha256 of the package it was verified against."""

    async def checksums(self) -> dict[str, str]: ...

    async def add_checksum(self, name: str, sha256: str) -> None: ...


class ImageCache:
    """Makes and finds gold images under ``data_dir``."""

    def __init__(
        self,
        data_dir: Path,
        http: httpx.AsyncClient,
        download_timeout: float = 30.0,
        limits: UnpackLimits | None = None,
        reserve_bytes: int = 0,
        checksums: ChecksumBook | None = None,
        growth: Callable[[], int] | None = None,
        on_change: Callable[[Image, bool], None] | None = None,
    ) -> None:
        self._images = data_dir.absolute() / "images"
        self._uses = data_dir.absolute() / "last-used"
        self._downloads = data_dir.absolute() / "downloads"
        self._http = http
        self._timeout = download_timeout
        self._limits = limits or UnpackLimits()
        self._reserve_bytes = reserve_bytes
        self._growth = growth
        """What the running machines' disks can still grow into, which a download leaves free
        too (blocking)."""
        self._inflight: dict[str, asyncio.Task[GoldImage]] = {}
        self._specs: dict[str, ImageSpec] = {}
        self._fetched_from: set[tuple[str, str]] = set()
        """(gold key, URL) of the fetches that this cache made since it started."""
        self._progress: dict[str, DownloadProgress] = {}
        self._failures: dict[str, VMFailure] = {}
        self._forgetting: dict[str, asyncio.TimerHandle] = {}
        """When each failed fetch is forgotten (``FAILED_KEPT``)."""
        self._locks: dict[str, asyncio.Lock] = {}
        self._book = checksums
        self._learnt: dict[str, str] = {}
        """The sha256 of the package that each checksum (``md5-<hex>``) was verified against."""
        self._by_content: dict[str, str] = {}
        """The gold image (its key) of each package sha256."""
        self._on_change = on_change
        """Told of each image that starts or ends a fetch, and of each deleted one (``True``)."""

    async def open(self) -> None:
        """Create the folders, drop what a crash may have left half-made, and read what each
        gold image's package was."""
        await asyncio.to_thread(self._clean)
        self._by_content = await asyncio.to_thread(self._contents)
        if self._book is not None:
            self._learnt = await self._book.checksums()

    def _clean(self) -> None:
        for folder in (self._images, self._downloads, self._uses):
            folder.mkdir(parents=True, exist_ok=True)
        for partial in [*self._downloads.iterdir(), *self._images.glob(".tmp-*")]:
            remove(partial)
        for root in self._images.glob("*-*"):
            upgrade_metadata(root)

    def _contents(self) -> dict[str, str]:
        """The gold image of each package sha256 that is known: those published by this code,
        and those whose ID is their sha256."""
        found: dict[str, str] = {}
        sha256_first = sorted(self._images.glob("*-*"), key=lambda r: r.name[:7] != "sha256-")
        for root in sha256_first:
            meta = read_metadata(root)
            if meta is not None and (content := content_of(root.name, meta)) is not None:
                found.setdefault(content, root.name)
        return found

    def resolve(self, key: str) -> str:
        """The ID of the gold image that the checksum ``key`` (``<type>-<checksum>``) names:
        the image fetched by it, or the one whose package it was verified against; ``key``
        itself when there is none."""
        if key.startswith(".") or "/" in key or read_metadata(self._images / key) is not None:
            return key
        kind, _, checksum = key.partition("-")
        content = checksum if kind == "sha256" else self._learnt.get(key)
        return self._by_content.get(content, key) if content else key

    def lock(self, key: str) -> asyncio.Lock:
        """Held while a clone is made from the image ``key``, and while it is deleted."""
        return self._locks.setdefault(key, asyncio.Lock())

    async def close(self) -> None:
        """Stop the downloads under way; their partial files go at the next ``open``."""
        for handle in self._forgetting.values():
            handle.cancel()
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def cached(self, spec: ImageSpec) -> GoldImage | None:
        """The gold image for ``spec`` if it is complete on disk."""
        key = self.resolve(spec.key)
        root = self._images / key
        meta = read_metadata(root)
        if meta is None:
            return None
        vmx = root / meta["vmx"] if meta.get("vmx") else None
        return GoldImage(key, root, DiskImage(root / meta["disk"], meta["format"]), vmx)

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
        await asyncio.to_thread(self._used, gold.key)
        return gold

    def content(self, key: str) -> str | None:
        """The sha256 of the package of the gold image that ``key`` names, if it is on disk
        (and was fetched since gold images keep it)."""
        key = self.resolve(key)
        meta = read_metadata(self._images / key)
        return None if meta is None else content_of(key, meta)

    def fetched_from(self, key: str, url: str) -> bool:
        """Whether this cache fetched the gold image that ``key`` names from ``url``: its
        first fetch, or one since whose package turned out to be it."""
        key = self.resolve(key)
        meta = read_metadata(self._images / key)
        return meta is not None and (meta["url"] == url or (key, url) in self._fetched_from)

    async def verify(self, spec: ImageSpec) -> str:
        """Download ``spec`` to check it, without keeping it: the sha256 of its package, once
        its checksum matched. Raises as a fetch does."""
        download = self._downloads / f"{spec.key}.{uuid.uuid4().hex}.part"
        try:
            return await fetch(self._http, spec, download, self._timeout, self._reserve_bytes,
                               on_start=lambda _: None)  # fmt: skip
        finally:
            await asyncio.to_thread(remove, download)

    def _used(self, key: str) -> None:
        """Mark the image as used now: the mtime of its file in ``last-used/``, set to the
        nanosecond. A touch takes the kernel's coarse clock, which gave two images used within
        one tick the same time, and made the cache's order a coin toss."""
        path = self._uses / key
        path.touch()
        now = time.time_ns()
        os.utime(path, ns=(now, now))

    def used_at(self, key: str) -> int:
        """When the image was last used, in nanoseconds since the epoch; 0 if never."""
        try:
            return (self._uses / key).stat().st_mtime_ns
        except FileNotFoundError:
            return 0

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
            self._drop_failure(spec.key)
            task.add_done_callback(lambda done: self._fetched(spec.key, done))
            self._changed(spec.key)
        return task

    def _fetched(self, key: str, task: asyncio.Task[GoldImage]) -> None:
        self._inflight.pop(key, None)
        self._progress.pop(key, None)
        if not task.cancelled() and isinstance(task.exception(), VMFailure):
            self._failures[key] = cast(VMFailure, task.exception())
            self._forgetting[key] = task.get_loop().call_later(FAILED_KEPT, self._forget, key)
        self._changed(key)

    def _forget(self, key: str) -> None:
        """Forget the failed fetch of ``key``, as deleting it would."""
        last = self.image(key)
        if self._drop_failure(key) is not None:
            self._specs.pop(key, None)
            self._changed(key, last)

    def _drop_failure(self, key: str) -> VMFailure | None:
        if (handle := self._forgetting.pop(key, None)) is not None:
            handle.cancel()
        return self._failures.pop(key, None)

    def _changed(self, key: str, last: Image | None = None) -> None:
        image = last or self.image(key)
        if self._on_change is not None and image is not None:
            self._on_change(image, last is not None)

    def progress(self, spec: ImageSpec) -> DownloadProgress | None:
        """How far the download of ``spec`` has come, while it runs."""
        return self._progress.get(spec.key)

    def images(self) -> list[Image]:
        """Every gold image on disk, being fetched, or whose last fetch failed; each once,
        whichever of its checksums it was asked for by."""
        on_disk = {root.name for root in self._images.glob("*-*") if not root.name.startswith(".")}
        found: dict[str, Image] = {}
        for key in sorted(on_disk | self._specs.keys()):
            if (image := self.image(key)) is not None:
                found.setdefault(image.id, image)
        return list(found.values())

    def image(self, key: str) -> Image | None:
        """The gold image that ``key`` (``<type>-<checksum>``, any of its checksums) names,
        if it is on disk, being fetched, or failed at its last fetch."""
        key = self.resolve(key)
        outside = key.startswith(".") or "/" in key  # no key names anything but an image
        meta = read_metadata(self._images / key) if not outside else None
        if meta is not None:
            kind, checksum = key.split("-", 1)
            return Image.model_validate({
                "id": key, "checksum": checksum, "checksum_type": kind,
                "checksums": self._checksums_of(key, meta),
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
            checksums={spec.checksum_type: spec.checksum.lower()}, url=spec.url, status=status,
            progress=self._progress.get(key), error=error,
        )  # fmt: skip

    def _checksums_of(self, key: str, meta: dict[str, Any]) -> dict[str, str]:
        """Every checksum the gold image ``key`` is known by: the one it was fetched by, its
        package's sha256, and those verified against that package since."""
        kind, checksum = key.split("-", 1)
        known = {kind: checksum}
        if (content := content_of(key, meta)) is not None:
            known["sha256"] = content
            for name, sha256 in self._learnt.items():
                if sha256 == content:
                    other, value = name.split("-", 1)
                    known.setdefault(other, value)
        return dict(sorted(known.items()))

    def _last_use(self, key: str) -> datetime | None:
        used = self.used_at(key)
        return datetime.fromtimestamp(used / 1e9, UTC) if used else None

    async def delete(self, key: str) -> None:
        """Remove the gold image ``key`` (any of its checksums). The caller makes sure that no
        VM uses it.

        It is renamed out of the way first, so it is gone at once and never seen half-removed.
        """
        key = self.resolve(key)
        if key in self._inflight:
            raise ImageInUse(f"image {key} is being downloaded", image=key)
        last = self.image(key)
        root = self._images / key
        if key.startswith(".") or "/" in key or not root.is_dir():
            if self._drop_failure(key) is None:
                raise ImageNotFound(f"there is no image {key}", image=key)
            self._specs.pop(key, None)  # a failed fetch: deleting forgets it
            self._changed(key, last)
            return
        doomed = self._images / f".tmp-deleted-{key}-{uuid.uuid4().hex}"
        root.rename(doomed)
        self._by_content = {c: k for c, k in self._by_content.items() if k != key}
        await asyncio.to_thread(remove, doomed)
        self._specs.pop(key, None)
        (self._uses / key).unlink(missing_ok=True)
        self._changed(key, last)
        log.info("gold image %s deleted", key)

    async def _fetch(self, spec: ImageSpec) -> GoldImage:
        download = self._downloads / f"{spec.key}.{uuid.uuid4().hex}.part"
        staging = self._images / f".tmp-{spec.key}-{uuid.uuid4().hex}"
        reserve = self._reserve_bytes
        if self._growth is not None:
            reserve += await asyncio.to_thread(self._growth)
        try:
            content = await fetch(
                self._http, spec, download, self._timeout, reserve,
                on_start=lambda progress: self._progress.__setitem__(spec.key, progress),
            )  # fmt: skip
            await self._learn(spec, content)
            if (same := self._gold_of(content)) is None:
                staging.mkdir()
                await asyncio.to_thread(self._unpack, download, staging, spec.url, content)
                await asyncio.to_thread(remove, download)
                await asyncio.to_thread(make_read_only, staging)
                # another fetch of the same package, under another checksum, may have
                # published it meanwhile: nothing is awaited between this look and the rename
                if (same := self._gold_of(content)) is None:
                    staging.rename(self._images / spec.key)
                    self._by_content[content] = spec.key
            if same is not None:
                log.info("image %s is the package of gold image %s: its checksum is remembered, "
                         "and the download is not kept", spec.key, same)  # fmt: skip
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            raise InsufficientSpace(
                f"the disk filled up while image {spec.key} was being fetched; "
                "everything of it was removed"
            ) from None
        finally:
            await asyncio.to_thread(remove, download)
            await asyncio.to_thread(remove, staging)
        gold = self.cached(spec)
        assert gold is not None
        self._fetched_from.add((gold.key, spec.url))
        self._used(gold.key)
        log.info("gold image %s is ready", gold.key)
        return gold

    async def _learn(self, spec: ImageSpec, content: str) -> None:
        """Remember that ``spec``'s checksum was verified against the package ``content``."""
        if spec.checksum_type == "sha256" or self._learnt.get(spec.key) == content:
            return
        if self._book is not None:
            await self._book.add_checksum(spec.key, content)
        self._learnt[spec.key] = content

    def _gold_of(self, content: str) -> str | None:
        """The gold image on disk whose package's sha256 is ``content``."""
        key = self._by_content.get(content)
        return key if key is not None and read_metadata(self._images / key) else None

    def _unpack(self, package: Path, staging: Path, url: str, sha256: str) -> None:
        content = staging / "content"
        content.mkdir()
        unpack(package, content, self._limits)
        found = inspect_package(content)
        meta = {
            "version": GOLD_FORMAT,
            "url": url,
            "sha256": sha256,
            "size_bytes": disk_usage(content),
            "disk": str(found.disk.path.relative_to(staging)),
            "format": found.disk.format,
            "vmx": str(found.vmx.relative_to(staging)) if found.vmx else None,
        }
        (staging / METADATA).write_text(json.dumps(meta))
