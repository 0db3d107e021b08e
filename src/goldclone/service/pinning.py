"""Registry tags resolved to digests, so that everything after admission names its image for
good: a create that names a tag gets the digest of the warm pool that names the same tag, if
there is one (a burst stays on what the pool has, whatever the tag does meanwhile), or else
what the registry says the tag is now; concurrent creates of one tag share that request. A
pool's tag is resolved when the pool is put, and again only when it is put again."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from goldclone.errors import (
    DownloadFailed,
    InvalidRequest,
    ManifestUnknown,
    RegistryUnavailable,
    URLForbidden,
)
from goldclone.image_spec import ImageSpec
from goldclone.images.oci.registry import Registry
from goldclone.references import Reference


class Pinning:
    def __init__(self, registry: Registry, pool_images: Callable[[], list[ImageSpec]]) -> None:
        self._registry = registry
        self._pool_images = pool_images
        self._asking: dict[str, asyncio.Task[str]] = {}

    async def pin(self, spec: ImageSpec, field: str, pools: bool = True) -> ImageSpec:
        """``spec`` with its tag resolved (and a pool's digest taken, with ``pools``)."""
        ref = spec.reference
        if ref is None or ref.digest is not None:
            return spec
        if pools:
            for image in self._pool_images():
                if (used := image.reference) is not None and used.named == ref.named:
                    return image
        return ImageSpec(oci=str(ref.pinned(await self._resolve(ref, field))))

    async def _resolve(self, ref: Reference, field: str) -> str:
        where = f"{field}." if field else ""
        task = self._asking.get(ref.named)
        if task is None:
            task = asyncio.create_task(self._registry.resolve(ref))
            self._asking[ref.named] = task
            task.add_done_callback(lambda _: self._asking.pop(ref.named, None))
        try:
            return await asyncio.shield(task)
        except (ManifestUnknown, URLForbidden) as exc:
            raise InvalidRequest(f"{where}oci: {exc.message}") from None
        except DownloadFailed as exc:
            raise RegistryUnavailable(
                f"{where}oci: cannot resolve the tag: {exc.message}"
            ) from None
