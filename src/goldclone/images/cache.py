"""The gold image cache: download once per package, verify while streaming, unpack, keep.

A gold image lives at ``images/<type>-<checksum>/`` (the checksum it was first fetched by)
and exists only once it is complete: the package is downloaded to ``downloads/``, unpacked
into a temporary folder beside the cache and renamed into place, so a half-made gold image is
never seen. Creates for the same image share one download.

A gold image is its disk (``images/names.py``): every download is also hashed with sha256,
and every disk once unpacked or pulled. A download under a checksum not known yet whose package
or disk is one that a gold image has already is not kept: its checksum is remembered (in the
``ChecksumBook``) as another name of that image, and later requests with it find the image at
once. An image from a registry (``images/oci/``) is named ``sha256-<its disk's sha256>``, and
the manifest it was pulled by, ``oci-<hex>``, names it too.
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
from typing import Any, cast

import httpx

from goldclone.errors import (
    DownloadFailed,
    ImageInUse,
    ImageMissing,
    ImageNotFound,
    InsufficientSpace,
    VMFailure,
)
from goldclone.image_spec import ImageSpec
from goldclone.images.checks import DiskImage, inspect_package
from goldclone.images.download import fetch
from goldclone.images.gold import (
    GOLD_FORMAT,
    METADATA,
    GoldImage,
    content_of,
    disk_usage,
    file_sha256,
    identity_of,
    make_read_only,
    read_metadata,
    remove,
    upgrade_metadata,
)
from goldclone.images.names import ChecksumBook, GoldNames
from goldclone.images.oci.pull import LocalChunk, Puller
from goldclone.images.unpack import UnpackLimits, unpack
from goldclone.models import DownloadProgress, ErrorBody, Image, ImageStatus
from goldclone.references import parse

log = logging.getLogger(__name__)

FAILED_KEPT = 3600.0
"""Seconds that a failed fetch stays listed, with its error, unless the image is asked for
again or deleted before: then it is forgotten, as a delete would."""


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
        puller: Puller | None = None,
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
        self._names = GoldNames(self._images, checksums)
        self._puller = puller
        """Pulls from registries; none: an image that names one fails."""
        self._on_change = on_change
        """Told of each image that starts or ends a fetch, and of each deleted one (``True``)."""

    async def open(self) -> None:
        """Create the folders, drop what a crash may have left half-made, and read what each
        gold image's package was."""
        await asyncio.to_thread(self._clean)
        await asyncio.to_thread(self._names.scan)
        await self._names.open()

    def _clean(self) -> None:
        for folder in (self._images, self._downloads, self._uses):
            folder.mkdir(parents=True, exist_ok=True)
        for partial in [*self._downloads.iterdir(), *self._images.glob(".tmp-*")]:
            remove(partial)
        for root in self._images.glob("*-*"):
            upgrade_metadata(root)

    def resolve(self, key: str) -> str:
        """The ID of the gold image that ``key`` names (``GoldNames.resolve``)."""
        return self._names.resolve(key)

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
        return self.cached_key(self.resolve(spec.key))

    async def ensure(
        self, spec: ImageSpec, on_fetch: Callable[[], Awaitable[None]] | None = None
    ) -> GoldImage:
        """Return the gold image for ``spec``, fetching it first unless it is cached.

        ``on_fetch`` is called when this caller has to wait for a download (its own or a
        shared one). Cancelling one caller does not cancel a download that others share.
        """
        gold = self.cached(spec)
        if gold is None and spec.id is not None:
            raise ImageMissing(f"image {spec.id} is not on this host")
        if gold is None:
            if on_fetch is not None:
                await on_fetch()
            gold = self.cached(spec)  # a shared fetch may have finished while on_fetch ran
        if gold is None:
            gold = await asyncio.shield(self._fetch_task(spec))
        await asyncio.to_thread(self._used, gold.key)
        return gold

    async def name(self, name: str, key: str) -> None:
        """Remember ``name`` (``oci-<hex>``, say) as another name of the gold image ``key``."""
        identity = self.identity(key)
        assert identity is not None, "a VMware VM has no disk identity to name"
        await self._names.learn(name, identity)

    def manifests(self, key: str) -> list[str]:
        """The registry manifests (``oci-<hex>``) known to carry the gold image ``key``."""
        meta = read_metadata(self._images / key)
        return [] if meta is None else self._names.manifests_of(key, meta)

    def identity(self, key: str) -> str | None:
        """The sha256 of the disk of the gold image that ``key`` names, if it is on disk."""
        meta = read_metadata(self._images / self.resolve(key))
        return None if meta is None else identity_of(meta)

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
        return meta is not None and (
            url in (meta["url"], meta["oci"]) or (key, url) in self._fetched_from
        )

    async def verify(self, spec: ImageSpec) -> str:
        """Check that ``spec``'s source gives what its name says, without keeping anything:
        the sha256 of its package (a URL's, downloaded once its checksum matched), or of the
        disk of a registry's manifest (served by that repository, and checked against its
        digest). Raises as a fetch does."""
        if (ref := spec.reference) is not None:
            if self._puller is None:
                raise DownloadFailed(f"{ref}: this service pulls from no registry")
            await self._puller.registry.manifest(ref)
            return self._names.learnt.get(spec.key, "")
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
                "checksums": self._names.names_of(key, meta), "url": meta["url"],
                "oci": meta["oci"], "disk_sha256": identity_of(meta), "name": meta.get("name"),
                "status": ImageStatus.READY,
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
        kind, checksum = key.split("-", 1)
        kind = "sha256" if spec.oci else kind  # a pull is named by its manifest's sha256
        return Image.model_validate({
            "id": key, "checksum": checksum, "checksum_type": kind,
            "checksums": {kind: checksum} if not spec.oci else {}, "url": spec.url or "",
            "oci": spec.oci, "status": status, "progress": self._progress.get(key), "error": error,
        })  # fmt: skip

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
        self._names.forget(key)
        await asyncio.to_thread(remove, doomed)
        self._specs.pop(key, None)
        (self._uses / key).unlink(missing_ok=True)
        self._changed(key, last)
        log.info("gold image %s deleted", key)

    async def _fetch(self, spec: ImageSpec) -> GoldImage:
        staging = self._images / f".tmp-{spec.key}-{uuid.uuid4().hex}"
        reserve = self._reserve_bytes
        if self._growth is not None:
            reserve += await asyncio.to_thread(self._growth)
        try:
            if spec.oci is None:
                meta = await self._download(spec, staging, reserve)
            else:
                meta = await self._pull(spec, staging, reserve)
            if meta is not None:
                key = f"sha256-{meta['disk_sha256']}" if spec.oci else spec.key
                await self._publish(key, [spec.key], staging, meta)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            raise InsufficientSpace(
                f"the disk filled up while image {spec.key} was being fetched; "
                "everything of it was removed"
            ) from None
        finally:
            await asyncio.to_thread(remove, staging)
        gold = self.cached(spec)
        assert gold is not None
        self._fetched_from.add((gold.key, spec.source))
        self._used(gold.key)
        log.info("gold image %s is ready", gold.key)
        return gold

    async def _download(
        self, spec: ImageSpec, staging: Path, reserve: int
    ) -> dict[str, Any] | None:
        """Download and unpack ``spec`` into ``staging``: its ``gold.json``; ``None`` when
        its package is one a gold image has already."""
        download = self._downloads / f"{spec.key}.{uuid.uuid4().hex}.part"
        try:
            content = await fetch(
                self._http, spec, download, self._timeout, reserve,
                on_start=lambda progress: self._progress.__setitem__(spec.key, progress),
            )  # fmt: skip
            await self._names.learn(spec.key, content)
            if (same := self._names.holding(content)) is not None:
                log.info("image %s is the package of gold image %s: its checksum is remembered, "
                         "and the download is not kept", spec.key, same)  # fmt: skip
                return None
            staging.mkdir()
            return await asyncio.to_thread(self._unpack, download, staging, spec.source, content)
        finally:
            await asyncio.to_thread(remove, download)

    async def _pull(self, spec: ImageSpec, staging: Path, reserve: int) -> dict[str, Any]:
        """Pull ``spec`` (a pinned registry reference) into ``staging``: its ``gold.json``."""
        ref = parse(spec.source)
        if self._puller is None:
            raise DownloadFailed(f"{ref}: this service pulls from no registry")
        manifest = await self._puller.registry.manifest(ref)
        staging.mkdir()

        def local(layer: str) -> LocalChunk | None:
            found = self._names.chunk(layer)
            gold = self.cached_key(found[0]) if found else None
            return LocalChunk(gold.disk.path, found[1]) if gold and found else None

        pulled = await self._puller.pull(
            ref, manifest, staging, reserve,
            lambda progress: self._progress.__setitem__(spec.key, progress), local,
        )  # fmt: skip
        return await asyncio.to_thread(self._describe, staging, pulled.disk, pulled.format, {
            "url": "", "oci": str(ref), "sha256": pulled.disk_sha256,
            "disk_sha256": pulled.disk_sha256, "chunks": pulled.chunks,
        })  # fmt: skip

    async def _publish(
        self, key: str, names: list[str], staging: Path, meta: dict[str, Any]
    ) -> str:
        """Make ``staging`` the gold image ``key``, unless a gold image of the same disk is
        here: then ``names`` (and the package's sha256) are remembered as names of that one.
        The ID of the gold image."""
        identity = identity_of(meta)
        same = self._names.holding(identity) if identity is not None else None
        if same is None:
            await asyncio.to_thread(make_read_only, staging)
            # another fetch of the same disk may have published it meanwhile: nothing is
            # awaited between this look and the rename
            if identity is None or (same := self._names.holding(identity)) is None:
                staging.rename(self._images / key)
                self._names.register(key, meta)
        if same is not None:
            log.info("image %s has the disk of gold image %s: it is remembered as another name "
                     "of it, and not kept twice", names[0] if names else key, same)  # fmt: skip
        if identity is not None:
            for name in [*names, f"sha256-{meta['sha256']}"]:
                await self._names.learn(name, identity)
        return same or key

    async def add_disk(
        self, make: Callable[[Path], Awaitable[tuple[Path, str, dict[str, Any]]]],
        names: Callable[[], list[str]],
    ) -> GoldImage:  # fmt: skip
        """A gold image of a disk that ``make`` writes into the folder it is given (a VM's,
        say), with what it adds to ``gold.json``; named ``sha256-<its disk's sha256>``, and by
        ``names()`` (asked once ``make`` has run), unless one of that disk is here."""
        staging = self._images / f".tmp-made-{uuid.uuid4().hex}"
        try:
            (staging / "content").mkdir(parents=True)
            disk, disk_format, extra = await make(staging / "content")
            sha256 = await asyncio.to_thread(file_sha256, disk)
            meta = await asyncio.to_thread(self._describe, staging, disk, disk_format, {
                "url": "", "oci": None, "sha256": sha256, "disk_sha256": sha256, **extra,
            })  # fmt: skip
            key = await self._publish(f"sha256-{sha256}", names(), staging, meta)
        finally:
            await asyncio.to_thread(remove, staging)
        gold = self.cached_key(key)
        assert gold is not None
        self._used(key)
        self._changed(key)
        log.info("gold image %s is made", key)
        return gold

    def cached_key(self, key: str) -> GoldImage | None:
        """The gold image ``key`` (its ID) if it is complete on disk."""
        root = self._images / key
        meta = read_metadata(root)
        if meta is None:
            return None
        vmx = root / meta["vmx"] if meta.get("vmx") else None
        return GoldImage(key, root, DiskImage(root / meta["disk"], meta["format"]), vmx)

    def _unpack(self, package: Path, staging: Path, url: str, sha256: str) -> dict[str, Any]:
        content = staging / "content"
        content.mkdir()
        unpack(package, content, self._limits)
        found = inspect_package(content)
        vmx = str(found.vmx.relative_to(staging)) if found.vmx else None
        disk_sha256 = None if vmx else file_sha256(found.disk.path)
        extra = {"url": url, "oci": None, "sha256": sha256, "disk_sha256": disk_sha256, "vmx": vmx}
        return self._describe(staging, found.disk.path, found.disk.format, extra)

    def _describe(
        self, staging: Path, disk: Path, disk_format: str, extra: dict[str, Any]
    ) -> dict[str, Any]:
        """Write a gold image's ``gold.json`` into ``staging`` (blocking); what it says."""
        meta = {
            "version": GOLD_FORMAT, "size_bytes": disk_usage(staging / "content"),
            "disk": str(disk.relative_to(staging)), "format": disk_format, "vmx": None, **extra,
        }  # fmt: skip
        (staging / METADATA).write_text(json.dumps(meta))
        return meta
