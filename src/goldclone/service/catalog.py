"""The gold images as the API shows them: with the VMs that use each, fetched ahead of time,
deleted only when no VM or pool uses it, and kept within the cache budget (the least recently
used unused ones go first)."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable

from goldclone.errors import (
    ImageError,
    ImageInUse,
    ImageNotFound,
    ImageNotReady,
    InvalidRequest,
    TemplateInUse,
    TemplateNotFound,
)
from goldclone.image_spec import ImageSpec
from goldclone.images.cache import ImageCache
from goldclone.models import VM, Image, ImageStatus, Status, TemplateStatus
from goldclone.service.admission import Admission
from goldclone.service.image_access import ImageAccess
from goldclone.service.pinning import Pinning
from goldclone.service.pools import Pools
from goldclone.service.templates import Templates
from goldclone.shape import Shape
from goldclone.store import vm_records
from goldclone.store.database import Database

log = logging.getLogger(__name__)


class Catalog:
    def __init__(
        self,
        db: Database,
        images: ImageCache,
        admission: Admission,
        templates: Templates,
        pools: Pools,
        access: ImageAccess,
        pinning: Pinning,
        budget: int | None = None,
    ) -> None:
        self._pinning = pinning
        self._db = db
        self._access = access
        self._pools = pools
        self._images = images
        self._admission = admission
        self._templates = templates
        self._budget = budget
        self._trimming = asyncio.Lock()

    def held(self) -> dict[str, list[str]]:
        """Each gold image this host holds, with every name it is known by (its ID,
        ``<type>-<hex>`` of its checksums, ``oci-<hex>`` of its manifests), for placement."""
        return {
            image.id: [
                image.id,
                *(f"{k}-{v}" for k, v in image.checksums.items()),
                *self._images.manifests(image.id),
            ]
            for image in self._images.images()
            if image.status is ImageStatus.READY
        }

    async def images(self, tenant: str | None = None) -> list[Image]:
        """Every gold image that ``tenant`` sees (``ImageAccess``; every one, with ``None``),
        with how many VMs use each, its templates, and whether it is public."""
        return await self._shown(self._images.images(), tenant)

    async def _shown(self, images: list[Image], tenant: str | None) -> list[Image]:
        """Those of ``images`` that ``tenant`` sees, as ``images`` shows them."""
        seen = await self._access.seen_by(tenant)
        public = await self._access.public()
        asked = Counter(vm.image.key for vm in await self._users())
        users = Counter[str]()
        for key, count in asked.items():  # each checksum looked up once
            users[self._images.resolve(key)] += count
        found = []
        for image in images:
            if not self._access.sees(tenant, seen, image.model_dump(mode="json")):
                continue
            templates = await self._templates.of_image(image.id)
            shared = self._images.content(image.id) in public
            found.append(image.model_copy(
                update={"vms": users[image.id], "templates": templates, "public": shared}
            ))  # fmt: skip
        return found

    async def seen_by(self, tenant: str | None) -> Callable[[str], bool]:
        """Whether ``tenant`` sees a ready image held by any host, by its ID, as
        ``ImageAccess.sees`` says; an image this host has not fetched is known by its ID only
        when that is its package's sha256."""
        seen = await self._access.seen_by(tenant)

        def sees(image_id: str) -> bool:
            sha256 = image_id.removeprefix("sha256-") if image_id.startswith("sha256-") else None
            image = {"id": image_id, "status": "ready", "checksums": {"sha256": sha256}}
            return self._access.sees(tenant, seen, image)

        return sees

    async def prefetch(self, spec: ImageSpec, tenant: str) -> Image:
        """Start fetching an image for ``tenant`` ahead of the first VM that needs it. An
        image in the cache already is the tenant's once its URL has shown it has it, which
        may take a download (``ImageAccess.shown``); a URL that does not give it is a 400."""
        if spec.id is not None:
            raise InvalidRequest("id: an image named by its ID is here already, or nowhere")
        self._admission.check_image("", spec)
        spec = await self._pinning.pin(spec, "", pools=False)
        self._access.asked(spec, tenant)
        if self._images.cached(spec) is None:
            self._images.prefetch(spec)
        else:
            try:
                await self._access.shown(spec, tenant)
            except ImageError as exc:
                raise InvalidRequest(f"url: {exc.message}") from None
        image = self._images.image(spec.key)
        assert image is not None  # cached, or its fetch was just started
        return image

    async def trim(self) -> None:
        """Remove the least recently used gold images that nothing needs (no VM, pool or
        template being made), with their templates, until the ready ones and their
        templates fit the budget; an image in use is never removed."""
        if self._budget is None:
            return
        async with self._trimming:
            tried: set[str] = set()
            while (over := cache_bytes(images := await self.images()) - self._budget) > 0:
                unused = [i for i in images if i.id not in tried and self._unneeded(i)]
                if not unused:
                    log.warning("gold images take %d bytes over the cache budget, but every "
                                "one is in use", over)  # fmt: skip
                    return
                oldest = min(unused, key=lambda image: self._images.used_at(image.id))
                tried.add(oldest.id)
                try:
                    await self.delete(oldest.id)
                except (ImageInUse, ImageNotFound):
                    continue  # taken or deleted meanwhile: look again
                log.info("gold image %s removed: the cache was %d bytes over its budget",
                         oldest.id, over)  # fmt: skip

    def _unneeded(self, image: Image) -> bool:
        return (
            image.status is ImageStatus.READY
            and image.vms == 0
            and not self._pools.image_users(image.id)
            and all(t.status is not TemplateStatus.CREATING for t in image.templates)
        )

    async def set_public(self, image_id: str, public: bool) -> Image:
        """Make a ready gold image every tenant's, or only theirs that showed they have it."""
        image = self._images.image(image_id)
        if image is None:
            raise ImageNotFound(f"there is no image {image_id!r}", image=image_id)
        if image.status is not ImageStatus.READY:
            raise ImageNotReady(
                f"image {image.id} is {image.status.value}, not ready", image=image.id
            )
        await self._access.set_public(image.id, public)
        [found] = [i for i in await self.images() if i.id == image.id]
        return found

    async def image(self, image_id: str, tenant: str | None = None) -> Image:
        """The gold image ``image_id`` (any of its checksums) as ``images`` shows it, if
        ``tenant`` sees it; ``ImageNotFound`` otherwise."""
        image = self._images.image(image_id)  # only its gold.json is read, not every image's
        for shown in await self._shown([image] if image else [], tenant):
            return shown
        raise ImageNotFound(f"there is no image {image_id}", image=image_id)

    async def delete_template(self, image_id: str, template_id: str) -> None:
        """Remove a template of this host's (also one being made, or that failed); refused
        with ``TemplateInUse`` while a VM restored from it, or a pool that restores from it,
        exists."""
        key = self._images.resolve(image_id)
        templates = await self._templates.of_image(key)
        template = next((found for found in templates if found.id == template_id), None)
        if template is None:
            raise TemplateNotFound(
                f"image {image_id} has no template {template_id} on this host", image=image_id
            )
        shape = Shape.of(template)
        async with self._images.lock(key):
            if pools := self._pools.image_users(key, shape):
                raise TemplateInUse(
                    f"template {template_id} is restored from by the warm pool(s) "
                    f"{', '.join(pools)}; delete them first"
                )
            # a VM being created may have been cloned from it and not yet say so
            users = [vm.id for vm in await self._users()
                     if self._images.resolve(vm.image.key) == key
                     and Shape.of(vm) == shape
                     and (vm.started_from != "cold" or vm.status is Status.CREATING)]  # fmt: skip
            if users:
                raise TemplateInUse(
                    f"template {template_id} is used by {len(users)} VM(s) restored from it or "
                    "being created; delete them first, or wait"
                )
            await self._templates.remove(key, template_id)

    async def delete(self, image_id: str) -> None:
        """Remove a gold image (named by any of its checksums), or forget a failed fetch;
        refused with ``ImageInUse`` while any VM or pool uses it."""
        image_id = self._images.resolve(image_id)
        if pools := self._pools.image_users(image_id):
            raise ImageInUse(
                f"image {image_id} is kept by the warm pool(s) {', '.join(pools)}; delete "
                "them first"
            )
        async with self._images.lock(image_id):
            users = [vm.id for vm in await self._users()
                     if self._images.resolve(vm.image.key) == image_id]  # fmt: skip
            if users:
                raise ImageInUse(
                    f"image {image_id} is used by {len(users)} VM(s); delete them first"
                )
            await self._templates.remove_all(image_id)
            await self._images.delete(image_id)

    async def _users(self) -> list[VM]:
        """The VMs that may hold a clone of their gold image: not those in ``error``, whose
        clone (if they got one) was removed when they failed."""
        host_id = self._db.host_id
        mine = await self._db.read(lambda conn: vm_records.of_host(conn, host_id))
        return [vm for vm in mine if vm.status is not Status.ERROR]


def cache_bytes(images: list[Image]) -> int:
    """Bytes that the ready images and their templates take."""
    ready = [image for image in images if image.status is ImageStatus.READY]
    return sum(image.size_bytes + sum(t.size_bytes for t in image.templates) for image in ready)
