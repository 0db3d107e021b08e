"""Which tenant may use and see which gold image.

A gold image is kept once per package, whoever fetched it, so a tenant that names another's
image by its checksum must not get it for free: it must show it has the package. A tenant has
shown it when it has before (by any URL), when the URL it names gave this cache the package,
or was shown to give it before (on any host, by any tenant: knowing the URL is having it), or
when an operator made the package public; otherwise the URL is downloaded once to check it
(``ImageCache.verify``), and the VM fails as a fetch would if it does not give the package. A
tenant sees the images it has shown it has, those it asked for that are still on their way,
and the public ones.
"""

from __future__ import annotations

import hashlib
from functools import partial
from typing import Any

from goldclone.errors import ChecksumMismatch, ImageMissing, ImageNotFound
from goldclone.image_spec import ImageSpec
from goldclone.images.cache import ImageCache
from goldclone.store import image_records
from goldclone.store.database import Database


class ImageAccess:
    """Who may use and see the gold images of this host."""

    def __init__(self, db: Database, images: ImageCache) -> None:
        self._db = db
        self._images = images
        self._remembered: set[tuple[str, str, str]] = set()
        """The sources (package, URL digest, tenant) written since this service started: a
        create of an image it has shown it has costs no write."""
        self._asked: dict[str, set[tuple[str, str]]] = {}
        """The tenants that asked for each image key since this service started, each with
        the URL it named."""

    def asked(self, spec: ImageSpec, tenant: str) -> None:
        """``tenant`` asked for ``spec``: it sees the image while it is on its way, and has
        shown it has it once a fetch from its URL has made it (``ready``)."""
        self._asked.setdefault(spec.key, set()).add((tenant, spec.source))

    async def ready(self, image_id: str) -> None:
        """The image ``image_id`` is ready: remember the tenants whose URL it was fetched
        from."""
        content = self._package(image_id)
        for key, asked in list(self._asked.items()):
            if self._images.resolve(key) != self._images.resolve(image_id):
                continue
            for tenant, url in list(asked):
                if self._images.fetched_from(key, url):
                    await self._remember(content, _url_sha256(url), tenant)

    async def shown(self, spec: ImageSpec, tenant: str) -> None:
        """Make sure that ``tenant``, which names the gold image of ``spec`` (in the cache now),
        has shown it has its package, checking ``spec``'s URL if need be, and remember it.
        Raises ``DownloadFailed`` or ``ChecksumMismatch`` when the URL (or the reference's
        repository) does not give it."""
        if spec.id is not None:
            if not await self.may_name(spec.id, tenant):
                raise ImageMissing(f"image {spec.id} is not one that this tenant may use")
            return
        content = self._package(spec.key)
        url = _url_sha256(spec.source)
        shown = await self._shown(spec, content, url, tenant)
        if not shown and not self._same(await self._images.verify(spec), spec.key):
            raise ChecksumMismatch(
                f"{spec.source} gives another package than image {spec.key} of this cache"
            )
        await self._remember(content, url, tenant)

    def _same(self, sha256: str, key: str) -> bool:
        """Whether the package or disk ``sha256`` is that of the gold image ``key`` names."""
        return self._images.resolve(f"sha256-{sha256}") == self._images.resolve(key)

    async def made(self, image_id: str, source: str, tenant: str) -> None:
        """``tenant`` made the image ``image_id`` (from ``source``, a VM): it has it."""
        await self._remember(self._package(image_id), _url_sha256(source), tenant)

    async def may_claim(self, spec: ImageSpec, tenant: str) -> bool:
        """Whether ``tenant``'s VM that names ``spec`` may take a pooled machine of its image
        now, without a check of its URL."""
        if spec.id is not None:
            return await self.may_name(spec.id, tenant)
        return self._images.content(spec.key) is not None and await self._shown(
            spec, self._package(spec.key), _url_sha256(spec.source), tenant
        )

    async def may_name(self, image_id: str, tenant: str) -> bool:
        """Whether ``tenant`` may name the gold image ``image_id`` by its ID: it has shown it
        has its package (or made it), or it is public. An image that is not here is known by
        its package's sha256 when its ID is ``sha256-``."""
        content = self._package(image_id)
        if content == image_id:
            content = image_id.removeprefix("sha256-")
        seen = await self._db.read(lambda conn: image_records.of_tenant(conn, tenant))
        return content in seen or content in await self.public()

    async def check_named(self, spec: ImageSpec, tenant: str) -> None:
        """Raise ``ImageNotFound`` for an image named by an ID that ``tenant`` may not use."""
        if spec.id is not None and not await self.may_name(spec.id, tenant):
            raise ImageNotFound(f"there is no image {spec.id}", image=spec.id)

    async def seen_by(self, tenant: str | None) -> set[str] | None:
        """The packages (sha256) whose images ``tenant`` sees; ``None``: every one."""
        if tenant is None:
            return None
        return await self._db.read(lambda conn: image_records.of_tenant(conn, tenant))

    async def public(self) -> set[str]:
        return await self._db.read(image_records.public)

    def sees(self, tenant: str | None, seen: set[str] | None, image: dict[str, Any]) -> bool:
        """Whether ``tenant``, which sees the packages ``seen`` (``seen_by``), sees ``image``
        (an ``Image`` as JSON)."""
        if seen is None or tenant is None:
            return True
        content = image.get("checksums", {}).get("sha256") or self._images.content(image["id"])
        if content in seen:
            return True
        on_its_way = image.get("status") != "ready"  # a ready one it has not shown it has
        return on_its_way and any(t == tenant for t, _ in self._asked.get(image["id"], ()))

    async def set_public(self, image_id: str, public: bool) -> None:
        """Make the package of the image ``image_id`` every tenant's, or not."""
        content = self._package(image_id)
        await self._db.write(lambda conn: image_records.set_public(conn, content, public))

    def _package(self, key: str) -> str:
        """What names the package of the gold image that ``key`` names: its sha256, or for an
        image fetched before gold images kept it, the image's ID."""
        return self._images.content(key) or self._images.resolve(key)

    async def _remember(self, content: str, url: str, tenant: str) -> None:
        if (content, url, tenant) not in self._remembered:
            add = partial(image_records.add_source, sha256=content, url_sha256=url, tenant=tenant)
            await self._db.write(add)
            self._remembered.add((content, url, tenant))

    async def _shown(self, spec: ImageSpec, content: str, url: str, tenant: str) -> bool:
        if self._images.fetched_from(spec.key, spec.source):
            return True
        return await self._db.read(lambda conn: image_records.shown(conn, content, url, tenant))


def _url_sha256(url: str) -> str:
    """A URL as it is remembered: it may hold a secret."""
    return hashlib.sha256(url.encode()).hexdigest()
