"""Whether a shape's disk size fits a gold image: a clone's disk is grown, never shrunk."""

from __future__ import annotations

import asyncio
from typing import Protocol

from goldclone.errors import DiskTooSmall, InvalidRequest
from goldclone.image_spec import ImageSpec
from goldclone.images.cache import ImageCache
from goldclone.images.checks import virtual_size
from goldclone.images.gold import GoldImage
from goldclone.shape import GIB, Shape, Shaped


async def fit_disk(gold: GoldImage, shape: Shape) -> int | None:
    """The bytes that a clone of ``gold`` in ``shape`` is grown to (``None``: left at the
    image's size); raises ``DiskTooSmall`` for a size below the image's."""
    if (wanted := shape.disk_bytes) is None:
        return None
    size = await asyncio.to_thread(virtual_size, gold.disk)
    if wanted < size:
        raise DiskTooSmall(
            f"disk_size: the image's disk is {-(-size // GIB)} GiB; a clone's disk can be "
            f"grown, not shrunk to {shape.disk_size} GiB"
        )
    return wanted


async def refuse_small_disk(gold: GoldImage, shape: Shape) -> None:
    """``fit_disk`` for a request still to be answered: a 400."""
    try:
        await fit_disk(gold, shape)
    except DiskTooSmall as exc:
        raise InvalidRequest(exc.message) from None


class _Asked(Shaped, Protocol):
    @property
    def image(self) -> ImageSpec: ...


async def fit_cached_disk(images: ImageCache, request: _Asked) -> None:
    """``refuse_small_disk`` for ``request``'s image if it is here already, rather than a VM
    or pool that fails once it is."""
    if request.disk_size is not None and (gold := images.cached(request.image)) is not None:
        await refuse_small_disk(gold, Shape.of(request))
