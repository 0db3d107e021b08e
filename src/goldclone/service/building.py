"""Gold images made from VMs, and gold images pushed to registries.

Making an image stops its VM cleanly (it stays ``stopped``, and is deleted as any VM is), has
the driver write its disk flattened into a new gold image's folder, and publishes it as
``sha256-<its disk's sha256>`` (or finds the gold image of that disk here). With ``push``,
the disk goes to the registry as goldclone's disk artifact before it is published, so that
the image records the reference it was pushed to. What a guest should forget before it is
an image (cloud-init's instance, its machine ID, SSH host keys) is the guest's business.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from goldclone.drivers.base import Driver
from goldclone.errors import DownloadFailed, InvalidRequest, RegistryUnavailable, VMConflict
from goldclone.images.cache import ImageCache
from goldclone.images.oci.push import push_disk
from goldclone.images.oci.registry import Registry
from goldclone.models import VM, Image, ImageBuild, Phase, Pushed, Status
from goldclone.references import Reference, digest_hex, parse
from goldclone.service.catalog import Catalog
from goldclone.service.image_access import ImageAccess
from goldclone.service.lifecycle import Lifecycle

log = logging.getLogger(__name__)

MADE_REASON = "its disk was made into a gold image"


class Builder:
    def __init__(
        self,
        lifecycle: Lifecycle,
        driver: Driver,
        images: ImageCache,
        registry: Registry,
        access: ImageAccess,
        catalog: Catalog,
    ) -> None:
        self._lifecycle = lifecycle
        self._driver = driver
        self._images = images
        self._registry = registry
        self._access = access
        self._catalog = catalog

    async def make(self, vm: VM, request: ImageBuild, tenant: str, mine: bool) -> Image:
        """A gold image of ``vm``'s disk (a VM of this host: ``mine``, ``running`` or
        ``stopped``), pushed if asked, and the cache trimmed; the VM is ``stopped`` after."""
        target = _tagged(request.push, "push") if request.push else None
        if not mine:
            raise VMConflict(f"VM {vm.id} is on host {vm.host}, which this host cannot relay "
                             "to: ask that host's API")  # fmt: skip
        if vm.status is Status.RUNNING:
            vm = await self._lifecycle.advance(
                vm.id, Phase.STOPPED, Status.RUNNING, Status.STOPPED, status_reason=MADE_REASON
            )
        elif vm.status is not Status.STOPPED:
            raise VMConflict(f"VM {vm.id} is {vm.status.value}: only a running or stopped VM "
                             "can be made into an image")  # fmt: skip
        machine = await self._lifecycle.machine(vm.id)
        names: list[str] = []

        async def made(folder: Path) -> tuple[Path, str, dict[str, Any]]:
            disk = folder / "disk.img"
            disk_format = await self._driver.export_disk(machine, disk)
            extra: dict[str, Any] = {"name": request.name}
            if target is not None:
                pinned, chunks = await self._push(target, disk, disk_format, request.chunk_mb)
                names.append(f"oci-{digest_hex(pinned.digest or '')}")
                extra |= {"oci": str(pinned), "chunks": chunks}
            return disk, disk_format, extra

        gold = await self._images.add_disk(made, lambda: names)
        await self._access.made(gold.key, f"vm:{vm.id}", tenant)
        log.info("VM %s was made into gold image %s (%s)", vm.id, gold.key, request.name)
        await self._catalog.trim()
        return await self._catalog.image(gold.key)

    async def push(
        self, image_id: str, reference: str, chunk_mb: int, tenant: str | None
    ) -> Pushed:
        """The gold image ``image_id`` (one that ``tenant`` sees) pushed under ``reference``."""
        target = _tagged(reference, "oci")
        image = await self._catalog.image(image_id, tenant)
        gold = self._images.cached_key(image.id)
        if gold is None:
            raise InvalidRequest(f"image {image.id} is {image.status.value}, not ready")
        if gold.vmx is not None:
            raise InvalidRequest(f"image {image.id} is a VMware VM: only a disk can be pushed")
        pinned, _ = await self._push(target, gold.disk.path, gold.disk.format, chunk_mb)
        await self._images.name(f"oci-{digest_hex(pinned.digest or '')}", gold.key)
        return Pushed(image_id=gold.key, oci=str(pinned))

    async def _push(
        self, ref: Reference, disk: Path, disk_format: str, chunk_mb: int
    ) -> tuple[Reference, dict[str, Any]]:
        try:
            digest, chunks = await push_disk(self._registry, ref, disk, disk_format, chunk_mb << 20)
        except DownloadFailed as exc:
            raise RegistryUnavailable(f"pushing to {ref}: {exc.message}") from None
        layers = [[chunk.layer.digest, chunk.sha256] for chunk in chunks]
        log.info("%s pushed: %d chunks", ref.pinned(digest), len(chunks))
        return ref.pinned(digest), {"size": chunk_mb << 20, "layers": layers}


def _tagged(reference: str, field: str) -> Reference:
    ref = parse(reference)
    if ref.digest is not None:
        raise InvalidRequest(f"{field}: a push names a tag, not a digest")
    return ref
