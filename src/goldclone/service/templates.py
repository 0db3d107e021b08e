"""Memory templates: booted, ready guests of one gold image and shape, saved once, from which
VMs of that image and shape are restored in about a second instead of booting.

A template is made like a VM that nobody sees: a linked clone of the gold image boots with its
RAM in the template's file, gets an IP, answers its guest agent (a restored VM is given its
own clock and identity through it, so a guest without one gets no template) and passes the
template's ``ready_when``; then the driver saves it (``save_template``) and the machine is
gone. Its files live in ``templates/<image>/<template id>/``, read-only, and go with the image.
A template cut off by a restart of the service ends in ``error`` (``interrupted``) at the
next start, with its machine and files removed.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import uuid
from collections import Counter
from pathlib import Path

from goldclone.clock import now_s
from goldclone.drivers.base import Driver, MachineSpec, Runtime, TemplateFiles
from goldclone.errors import (
    GoldcloneError,
    ImageNotFound,
    ImageNotReady,
    Interrupted,
    InvalidRequest,
    NotReady,
    TemplateFailed,
    VMFailure,
)
from goldclone.guest.config import GuestConfig
from goldclone.image_spec import ImageSpec
from goldclone.images.cache import ImageCache
from goldclone.images.gold import GoldImage
from goldclone.models import ErrorBody, ImageStatus, Template, TemplateRequest, TemplateStatus
from goldclone.polling import until
from goldclone.service.admission import Admission
from goldclone.service.readiness import wait_ready
from goldclone.service.sizing import refuse_small_disk
from goldclone.settings import Settings
from goldclone.shape import Shape
from goldclone.store import template_records
from goldclone.store.database import Database

log = logging.getLogger(__name__)


class Templates:
    """The memory templates of this host's gold images."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        images: ImageCache,
        driver: Driver,
        admission: Admission,
    ) -> None:
        self._settings = settings
        self._root = settings.data_dir.absolute() / "templates"
        self._db = db
        self._images = images
        self._driver = driver
        self._admission = admission
        self._building: dict[str, asyncio.Task[None]] = {}
        self._cold_boots: Counter[tuple[str, Shape]] = Counter()

    def files(self, template: Template) -> TemplateFiles:
        return TemplateFiles(self._root / template.image_id / template.id)

    async def create(self, image_id: str, request: TemplateRequest) -> Template:
        """Start making a template of gold image ``image_id`` for ``request``'s shape; if one
        of that image and shape exists already (in any state), that one is the answer."""
        if not self._driver.capabilities.memory_templates:
            raise InvalidRequest(
                f"the {self._driver.name} driver has no memory templates; its VMs boot cold"
            )
        shape = Shape.of(request)
        self._admission.check_shape(shape, request.ready_when)
        gold = self._gold(image_id)
        await refuse_small_disk(gold, shape)
        template = Template(
            id=str(uuid.uuid4()), image_id=gold.key, cpus=request.cpus, memory=request.memory,
            disk_size=request.disk_size, ready_when=request.ready_when, created_at=now_s(),
        )  # fmt: skip
        host_id = self._db.host_id
        recorded = await self._db.write(
            lambda conn: template_records.add(conn, host_id, template, template.id)
        )
        if recorded.id == template.id:
            task = asyncio.create_task(self._make(template, gold), name=f"template {template.id}")
            self._building[template.id] = task
            task.add_done_callback(lambda _: self._building.pop(template.id, None))
        return recorded

    async def booted_cold(self, image_id: str, shape: Shape) -> None:
        """Count a cold boot that a template could have spared; at the configured count
        (``template_after``), make the template of that image and shape."""
        after = self._settings.template_after
        if after <= 0 or not self._driver.capabilities.memory_templates:
            return
        self._cold_boots[image_id, shape] += 1
        if self._cold_boots[image_id, shape] == after:
            log.info("image %s booted cold %d times with %s: making a template",
                     image_id, after, shape.describe())  # fmt: skip
            try:
                await self.create(image_id, _request(shape))
            except GoldcloneError as exc:
                log.warning("no template of image %s: %s", image_id, exc.message)

    async def ready(self, image_id: str, shape: Shape) -> TemplateFiles | None:
        """The files of the ready template of this image and shape, if there is one."""
        for template, _ in await self._of_host(image_id):
            if Shape.of(template) == shape and template.status is TemplateStatus.READY:
                return self.files(template)
        return None

    async def made(self, image_id: str, shape: Shape) -> TemplateFiles:
        """The files of the ready template of this image and shape, made first if there is
        none. A template that failed is removed and raises ``TemplateFailed``, so that the
        next call makes it again."""
        template = await self.create(image_id, _request(shape))
        if (task := self._building.get(template.id)) is not None:
            await asyncio.shield(task)  # whoever waits for it, the template is made once
        for found, machine in await self._of_host(image_id):
            if found.id != template.id:
                continue
            if found.status is TemplateStatus.READY:
                return self.files(found)
            if found.status is TemplateStatus.ERROR:
                await self._remove(found, machine)
                error = found.error or ErrorBody(code="internal-error", message="unknown")
                raise TemplateFailed(f"its template failed: {error.code}: {error.message}")
        raise TemplateFailed(f"template {template.id} was removed while it was made")

    async def of_image(self, image_id: str) -> list[Template]:
        return [template for template, _ in await self._of_host(image_id)]

    async def remove_all(self, image_id: str) -> None:
        """Remove every template of the image, those being made included. The caller holds
        the image's lock and has made sure that no VM uses the image."""
        for template, machine in await self._of_host(image_id):
            await self._cancel_and_remove(template, machine)
        await asyncio.to_thread(shutil.rmtree, self._root / image_id, ignore_errors=True)

    async def remove(self, image_id: str, template_id: str) -> None:
        """Remove one template of the image, also while it is being made. The caller holds
        the image's lock and has made sure that no VM or pool uses it."""
        for template, machine in await self._of_host(image_id):
            if template.id == template_id:
                await self._cancel_and_remove(template, machine)

    async def _cancel_and_remove(self, template: Template, machine: str | None) -> None:
        if (task := self._building.get(template.id)) is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._remove(template, machine)

    async def recover(self) -> None:
        """End the templates that a stopped service was making as ``interrupted``."""
        for template, machine in await self._of_host():
            if template.status is TemplateStatus.CREATING:
                await self._remove(template, machine, keep_record=True)
                failed = _failed(template, Interrupted("the service stopped while it was made"))
                await self._put(failed)

    async def close(self) -> None:
        tasks = list(self._building.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _of_host(self, image_id: str | None = None) -> list[tuple[Template, str | None]]:
        """This host's templates (of ``image_id``), oldest first, with the machine making
        each."""
        host_id = self._db.host_id
        return await self._db.read(lambda conn: template_records.of_host(conn, host_id, image_id))

    async def _put(self, template: Template) -> None:
        await self._db.write(lambda conn: template_records.put(conn, template))

    def _gold(self, image_id: str) -> GoldImage:
        image = self._images.image(image_id)
        if image is None:
            raise ImageNotFound(f"there is no image {image_id}", image=image_id)
        spec = ImageSpec(url=image.url or "http://unknown/", checksum=image.checksum,
                         checksum_type=image.checksum_type)  # fmt: skip
        gold = self._images.cached(spec) if image.status is ImageStatus.READY else None
        if gold is None:
            raise ImageNotReady(
                f"image {image_id} is {image.status.value}: a template needs it ready on disk"
            )
        return gold

    async def _make(self, template: Template, gold: GoldImage) -> None:
        files = self.files(template)
        machine, runtime = template.id, None
        try:
            await asyncio.to_thread(files.folder.mkdir, parents=True, mode=0o700)
            async with self._images.lock(template.image_id):
                await self._driver.clone(machine, gold, disk_bytes=Shape.of(template).disk_bytes)
            runtime = await self._driver.attach(machine, self._driver.capabilities.network_types[0])
            await self._boot_and_save(template, files, runtime)
            size = await asyncio.to_thread(_size, files.folder)
            done = template.model_copy(update={"status": TemplateStatus.READY, "size_bytes": size})
            log.info("template %s of image %s is ready (%d MB)", template.id, template.image_id,
                     size >> 20)  # fmt: skip
        except asyncio.CancelledError:
            await self._discard(machine, runtime, files)
            raise
        except Exception as exc:
            log.warning("template %s of image %s failed: %s", template.id, template.image_id, exc)
            await self._discard(machine, runtime, files)
            done = _failed(template, exc)
        else:
            await self._driver.destroy(machine, runtime, graceful=False)
        await self._put(done)

    async def _boot_and_save(
        self, template: Template, files: TemplateFiles, runtime: Runtime
    ) -> None:
        guest = GuestConfig(template.id, f"template-{template.id.split('-')[0]}")
        spec = MachineSpec(runtime.machine, template.cpus, template.memory, True, guest, files)
        await self._driver.start(spec, runtime)
        ip = await self._driver.wait_for_ip(runtime, self._settings.ip_timeout)
        timeout = self._settings.ready_timeout

        async def agent_answers() -> bool:
            return await self._driver.agent_ping(runtime)

        try:
            await until(agent_answers, interval=1.0, timeout=timeout)
        except TimeoutError:
            raise NotReady(
                f"the guest's agent did not answer within {timeout:g} s: a VM restored from it "
                "could not be given its own clock, hostname and keys, so no template is made of it"
            ) from None
        if template.ready_when is not None:
            limit = template.ready_when.timeout or timeout
            await wait_ready(ip, template.ready_when, limit, agent_answers)
        await self._driver.settle(runtime, timeout)
        await self._driver.save_template(runtime.machine, runtime, files)

    async def _discard(self, machine: str, runtime: Runtime | None, files: TemplateFiles) -> None:
        await self._driver.destroy(machine, runtime, graceful=False)
        await asyncio.to_thread(shutil.rmtree, files.folder, ignore_errors=True)

    async def _remove(
        self, template: Template, machine: str | None, keep_record: bool = False
    ) -> None:
        if machine is not None:
            await self._driver.destroy(machine, None, graceful=False)
        await asyncio.to_thread(shutil.rmtree, self.files(template).folder, ignore_errors=True)
        if not keep_record:
            await self._db.write(lambda conn: template_records.forget(conn, template.id))


def _request(shape: Shape) -> TemplateRequest:
    return TemplateRequest(cpus=shape.cpus, memory=shape.memory, disk_size=shape.disk_size)


def _failed(template: Template, exc: Exception) -> Template:
    """``template`` in ``error``: a step's failure as it is, anything else as internal."""
    if isinstance(exc, VMFailure):
        error = ErrorBody(code=exc.code, message=exc.message)
    else:
        log.error("template %s failed unexpectedly", template.id, exc_info=exc)
        error = ErrorBody(code="internal-error", message="an internal error; see the server log")
    return template.model_copy(update={"status": TemplateStatus.ERROR, "error": error})


def _size(folder: Path) -> int:
    return sum(path.stat().st_blocks * 512 for path in folder.iterdir() if path.is_file())
