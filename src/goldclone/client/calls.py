"""Every call of the API as data (method, path, body, how to read the answer), shared by the
blocking and the asynchronous client, and the waits built of them."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from goldclone.client.errors import APIError, ImageFailed, VMFailed, WaitTimeout, error_of
from goldclone.image_spec import ImageSpec
from goldclone.models import (
    MAX_WAIT,
    VM,
    CreateVMRequest,
    Host,
    HostList,
    Image,
    ImageBuild,
    ImageList,
    ImagePush,
    ImageStatus,
    Pool,
    PoolList,
    PoolRequest,
    Pushed,
    Status,
    Template,
    TemplateList,
    TemplateRequest,
    UpdateVMRequest,
    VMList,
)

T = TypeVar("T")


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API call: what to send and how to read a successful answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    body: BaseModel | None = None
    waits: float = 0.0
    """Seconds the server may take on purpose (a ``?wait=true``), beyond the usual timeout."""

    def request(self, timeout: float) -> dict[str, Any]:
        body = self.body.model_dump(mode="json", exclude_unset=True) if self.body else None
        return {"method": self.method, "url": self.path, "json": body,
                "timeout": timeout + self.waits}  # fmt: skip

    def result(self, response: httpx.Response) -> T:
        if response.is_error:
            raise error_of(response.status_code, response.content)
        return self.parse(response)


def _model(model: type[BaseModel]) -> Callable[[httpx.Response], Any]:
    return lambda response: model.model_validate_json(response.content)


def _nothing(_: httpx.Response) -> None:
    return None


def _templates(response: httpx.Response) -> list[Template]:
    return TemplateList.model_validate_json(response.content).templates


class Calls:
    """Every call of the API, shared by both clients."""

    @staticmethod
    def create(request: CreateVMRequest) -> Call[VM]:
        return Call("POST", "/vms", _model(VM), request)

    @staticmethod
    def get(vm_id: str, wait: float = 0.0) -> Call[VM]:
        query = f"?wait=true&timeout={wait:.3f}" if wait > 0 else ""
        return Call("GET", f"/vms/{vm_id}{query}", _model(VM), waits=wait)

    @staticmethod
    def update(vm_id: str, change: UpdateVMRequest) -> Call[VM]:
        return Call("PATCH", f"/vms/{vm_id}", _model(VM), change)

    @staticmethod
    def list_vms(
        labels: Mapping[str, str] | None = None, statuses: Sequence[Status | str] = ()
    ) -> Call[list[VM]]:
        query = "&".join(
            [f"label={quote(f'{key}={value}')}" for key, value in (labels or {}).items()]
            + [f"status={quote(str(status))}" for status in statuses]
        )
        path = f"/vms?{query}" if query else "/vms"
        return Call("GET", path, lambda r: VMList.model_validate_json(r.content).vms)

    @staticmethod
    def delete(vm_id: str) -> Call[None]:
        return Call("DELETE", f"/vms/{vm_id}", _nothing)

    @staticmethod
    def images() -> Call[list[Image]]:
        return Call("GET", "/images", lambda r: ImageList.model_validate_json(r.content).images)

    @staticmethod
    def pull_image(spec: ImageSpec) -> Call[Image]:
        return Call("POST", "/images", _model(Image), spec)

    @staticmethod
    def make_image(vm_id: str, build: ImageBuild) -> Call[Image]:
        return Call("POST", f"/vms/{quote(vm_id, safe='')}/image", _model(Image), build)

    @staticmethod
    def push_image(image_id: str, push: ImagePush) -> Call[Pushed]:
        return Call("POST", f"/images/{image_id}/push", _model(Pushed), push)

    @staticmethod
    def hosts() -> Call[list[Host]]:
        return Call("GET", "/hosts", lambda r: HostList.model_validate_json(r.content).hosts)

    @staticmethod
    def forget_host(host_id: str) -> Call[None]:
        return Call("DELETE", f"/hosts/{quote(host_id, safe='')}", _nothing)

    @staticmethod
    def delete_image(image_id: str) -> Call[None]:
        return Call("DELETE", f"/images/{image_id}", _nothing)

    @staticmethod
    def image(image_id: str) -> Call[Image]:
        return Call("GET", f"/images/{image_id}", _model(Image))

    @staticmethod
    def templates(image_id: str) -> Call[list[Template]]:
        return Call("GET", f"/images/{image_id}/templates", _templates)

    @staticmethod
    def create_template(image_id: str, request: TemplateRequest) -> Call[Template]:
        return Call("POST", f"/images/{image_id}/templates", _model(Template), request)

    @staticmethod
    def delete_template(image_id: str, template_id: str) -> Call[None]:
        return Call("DELETE", f"/images/{image_id}/templates/{template_id}", _nothing)

    @staticmethod
    def pools() -> Call[list[Pool]]:
        return Call("GET", "/pools", lambda r: PoolList.model_validate_json(r.content).pools)

    @staticmethod
    def pool(name: str) -> Call[Pool]:
        return Call("GET", f"/pools/{quote(name, safe='')}", _model(Pool))

    @staticmethod
    def put_pool(name: str, request: PoolRequest) -> Call[Pool]:
        return Call("PUT", f"/pools/{quote(name, safe='')}", _model(Pool), request)

    @staticmethod
    def delete_pool(name: str) -> Call[None]:
        return Call("DELETE", f"/pools/{quote(name, safe='')}", _nothing)


class VMWaiter:
    """Waiting for a VM to run, as a sequence of ``GET ?wait=true`` calls (the server answers
    as soon as the VM is no longer ``creating``): each at most ``STEP`` seconds when the
    caller wants to see each update (``on_update``: a download's progress is no change the
    server waits for), else as long as the wait has left."""

    STEP = 0.25

    def __init__(self, vm_id: str, timeout: float, on_update: Callable[[VM], None] | None) -> None:
        self._vm_id, self._timeout, self._on_update = vm_id, timeout, on_update
        self._deadline = time.monotonic() + timeout

    def call(self) -> Call[VM]:
        left = max(0.0, self._deadline - time.monotonic())
        step = min(left, self.STEP if self._on_update else MAX_WAIT)
        return Calls.get(self._vm_id, wait=step or 0.001)

    def settled(self, vm: VM) -> bool:
        """Whether waiting is over with ``vm``; raises ``VMFailed`` if it ended badly and
        ``WaitTimeout`` when the time is up."""
        if self._on_update is not None:
            self._on_update(vm)
        if vm.status is Status.RUNNING and vm.ip_address:
            return True
        if vm.status in (Status.ERROR, Status.STOPPED, Status.DELETING):
            raise VMFailed(vm)
        if time.monotonic() >= self._deadline:
            raise WaitTimeout(f"VM {vm.id}", vm.status.value, self._timeout, vm)
        return False


class ImageWaiter:
    """Waiting for an image to be ready: there is no ``?wait`` for images, so the list is read
    every ``POLL`` seconds."""

    POLL = 0.25

    def __init__(
        self, image_id: str, timeout: float, on_update: Callable[[Image], None] | None
    ) -> None:
        self._image_id, self._timeout, self._on_update = image_id, timeout, on_update
        self._deadline = time.monotonic() + timeout

    def settled(self, images: list[Image]) -> Image | None:
        """The image once ready, None while it is on its way; raises ``ImageFailed`` if it
        failed or is gone, and ``WaitTimeout`` when the time is up."""
        found = [image for image in images if image.id == self._image_id]
        if not found:
            raise APIError(404, "image-not-found", f"no image {self._image_id}")
        image = found[0]
        if self._on_update is not None:
            self._on_update(image)
        if image.status is ImageStatus.READY:
            return image
        if image.status is ImageStatus.ERROR:
            raise ImageFailed(image)
        if time.monotonic() >= self._deadline:
            raise WaitTimeout(f"image {image.id}", image.status.value, self._timeout)
        return None


def console_request(vm_id: str, follow: bool, timeout: float) -> dict[str, Any]:
    """The ``GET /vms/{id}/console`` to stream, with the client's ``timeout``; a followed one
    has no read timeout (the guest may be quiet for long)."""
    params = {"follow": "true"} if follow else {}
    limits = httpx.Timeout(timeout, read=None) if follow else httpx.Timeout(timeout)
    return {"method": "GET", "url": f"/vms/{vm_id}/console", "params": params, "timeout": limits}
