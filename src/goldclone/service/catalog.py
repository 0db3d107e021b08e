"""The gold images as the API shows them: with the VMs that use each, fetched ahead of time,
and deleted only when no VM or pool uses it."""

from __future__ import annotations

from collections import Counter

from goldclone.errors import ImageInUse
from goldclone.images.cache import ImageCache
from goldclone.models import Image, ImageSpec
from goldclone.service.admission import Admission
from goldclone.service.pools import Pools
from goldclone.service.store import Store
from goldclone.service.templates import Templates


class Catalog:
    def __init__(
        self,
        store: Store,
        images: ImageCache,
        admission: Admission,
        templates: Templates,
        pools: Pools,
    ) -> None:
        self._store = store
        self._pools = pools
        self._images = images
        self._admission = admission
        self._templates = templates

    async def images(self) -> list[Image]:
        """Every gold image, with how many VMs use each, and its templates."""
        users = Counter(vm.image.key for vm in await self._store.list())
        found = []
        for image in self._images.images():
            templates = await self._templates.of_image(image.id)
            found.append(image.model_copy(update={"vms": users[image.id], "templates": templates}))
        return found

    def prefetch(self, spec: ImageSpec) -> Image:
        """Start fetching an image ahead of the first VM that needs it."""
        self._admission.check_url("url", spec.url)
        self._images.prefetch(spec)
        image = self._images.image(spec.key)
        assert image is not None  # cached, or its fetch was just started
        return image

    async def delete(self, image_id: str) -> None:
        """Remove a gold image; refused with ``ImageInUse`` while any VM or pool uses it."""
        if pools := self._pools.image_users(image_id):
            raise ImageInUse(
                f"image {image_id} is kept by the warm pool(s) {', '.join(pools)}; delete "
                "them first"
            )
        async with self._images.lock(image_id):
            users = [vm.id for vm in await self._store.list() if vm.image.key == image_id]
            if users:
                raise ImageInUse(
                    f"image {image_id} is used by {len(users)} VM(s); delete them first"
                )
            await self._templates.remove_all(image_id)
            await self._images.delete(image_id)
