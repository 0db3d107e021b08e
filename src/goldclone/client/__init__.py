"""A typed Python client for the goldclone API, synchronous (``Client``) and asynchronous
(``AsyncClient``). Both speak through the API's own models, so a request that the server would
refuse as malformed is refused here before it is sent.

Errors::

    ClientError
    ├── ServerUnreachable   the server could not be reached
    ├── APIError            the server answered with an error; carries its ``code``
    ├── Failed              what was waited for ended badly; carries its ``code``
    │   ├── VMFailed        a VM ended in ``error`` (or stopped)
    │   └── ImageFailed     an image's download or unpacking failed
    └── WaitTimeout         a VM or image was still on its way when the wait ran out
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from goldclone.models import (
    MAX_WAIT,
    VM,
    CreateVMRequest,
    Host,
    HostList,
    Image,
    ImageList,
    ImageSpec,
    ImageStatus,
    Status,
    UpdateVMRequest,
    VMList,
)

DEFAULT_URL = "http://127.0.0.1:12345"
T = TypeVar("T")


def default_url() -> str:
    """``GOLDCLONE_URL``, or the server's default address."""
    return os.environ.get("GOLDCLONE_URL") or DEFAULT_URL


def _auth_headers(token: str | None) -> dict[str, str]:
    """The bearer token given, or ``GOLDCLONE_TOKEN``, as a header; none without either."""
    token = token or os.environ.get("GOLDCLONE_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


class ClientError(Exception):
    """The root of the client's errors."""


class ServerUnreachable(ClientError):
    pass


class APIError(ClientError):
    """An error answer, with the server's machine ``code`` and human ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class Failed(ClientError):
    """What was waited for ended badly, with its error's ``code`` and ``message``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


class VMFailed(Failed):
    """The VM ended in ``error`` (its ``code`` and ``message`` are the VM's) or stopped."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        if vm.error:
            super().__init__(vm.error.code, vm.error.message)
        else:
            super().__init__(vm.status.value, f"the VM is {vm.status.value}")


class ImageFailed(Failed):
    """The image's download or unpacking failed; ``code`` and ``message`` are its error's."""

    def __init__(self, image: Image) -> None:
        self.image = image
        error = image.error
        super().__init__(error.code if error else "image-failed",
                         error.message if error else "the image failed")  # fmt: skip


class WaitTimeout(ClientError):
    """A VM (``vm``, its last state) or an image was still on its way when the wait ran out."""

    def __init__(self, subject: str, status: str, timeout: float, vm: VM | None = None) -> None:
        super().__init__(f"{subject} is still {status} after {timeout:g} s")
        self.vm = vm


@dataclass(frozen=True)
class _Call(Generic[T]):
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
            raise _error_of(response.status_code, response.content)
        return self.parse(response)


def _model(model: type[BaseModel]) -> Callable[[httpx.Response], Any]:
    return lambda response: model.model_validate_json(response.content)


def _nothing(_: httpx.Response) -> None:
    return None


class _Calls:
    """Every call of the API, shared by both clients."""

    @staticmethod
    def create(request: CreateVMRequest) -> _Call[VM]:
        return _Call("POST", "/vms", _model(VM), request)

    @staticmethod
    def get(vm_id: str, wait: float = 0.0) -> _Call[VM]:
        query = f"?wait=true&timeout={wait:.3f}" if wait > 0 else ""
        return _Call("GET", f"/vms/{vm_id}{query}", _model(VM), waits=wait)

    @staticmethod
    def update(vm_id: str, change: UpdateVMRequest) -> _Call[VM]:
        return _Call("PATCH", f"/vms/{vm_id}", _model(VM), change)

    @staticmethod
    def list_vms(
        labels: Mapping[str, str] | None = None, statuses: Sequence[Status | str] = ()
    ) -> _Call[list[VM]]:
        query = "&".join(
            [f"label={quote(f'{key}={value}')}" for key, value in (labels or {}).items()]
            + [f"status={quote(str(status))}" for status in statuses]
        )
        path = f"/vms?{query}" if query else "/vms"
        return _Call("GET", path, lambda r: VMList.model_validate_json(r.content).vms)

    @staticmethod
    def delete(vm_id: str) -> _Call[None]:
        return _Call("DELETE", f"/vms/{vm_id}", _nothing)

    @staticmethod
    def images() -> _Call[list[Image]]:
        return _Call("GET", "/images", lambda r: ImageList.model_validate_json(r.content).images)

    @staticmethod
    def pull_image(spec: ImageSpec) -> _Call[Image]:
        return _Call("POST", "/images", _model(Image), spec)

    @staticmethod
    def hosts() -> _Call[list[Host]]:
        return _Call("GET", "/hosts", lambda r: HostList.model_validate_json(r.content).hosts)

    @staticmethod
    def forget_host(host_id: str) -> _Call[None]:
        return _Call("DELETE", f"/hosts/{quote(host_id, safe='')}", _nothing)

    @staticmethod
    def delete_image(image_id: str) -> _Call[None]:
        return _Call("DELETE", f"/images/{image_id}", _nothing)


class _Waiter:
    """Waiting for a VM to run, as a sequence of ``GET ?wait=true`` calls (the server answers
    as soon as the VM is no longer ``creating``): each at most ``STEP`` seconds when the
    caller wants to see each update (``on_update``: a download's progress is no change the
    server waits for), else as long as the wait has left."""

    STEP = 0.25

    def __init__(self, vm_id: str, timeout: float, on_update: Callable[[VM], None] | None) -> None:
        self._vm_id, self._timeout, self._on_update = vm_id, timeout, on_update
        self._deadline = time.monotonic() + timeout

    def call(self) -> _Call[VM]:
        left = max(0.0, self._deadline - time.monotonic())
        step = min(left, self.STEP if self._on_update else MAX_WAIT)
        return _Calls.get(self._vm_id, wait=step or 0.001)

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


class _ImageWaiter:
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


def _console_request(vm_id: str, follow: bool, timeout: float) -> dict[str, Any]:
    """The ``GET /vms/{id}/console`` to stream, with the client's ``timeout``; a followed one
    has no read timeout (the guest may be quiet for long)."""
    params = {"follow": "true"} if follow else {}
    limits = httpx.Timeout(timeout, read=None) if follow else httpx.Timeout(timeout)
    return {"method": "GET", "url": f"/vms/{vm_id}/console", "params": params, "timeout": limits}


def _error_of(status: int, body: bytes) -> APIError:
    try:
        error = json.loads(body)
        return APIError(status, str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):
        return APIError(status, "http-error", f"HTTP {status}")


class Client:
    """The goldclone API over HTTP, blocking. Use it as a context manager, or ``close()``."""

    def __init__(
        self,
        url: str | None = None,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._timeout = timeout
        self._http = httpx.Client(
            base_url=url or default_url(), headers=_auth_headers(token), timeout=timeout,
            transport=transport,
        )  # fmt: skip

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _do(self, call: _Call[T]) -> T:
        try:
            response = self._http.request(**call.request(self._timeout))
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"cannot reach {self._http.base_url}: {exc}") from exc
        return call.result(response)

    def create(self, request: CreateVMRequest) -> VM:
        return self._do(_Calls.create(request))

    def get(self, vm_id: str) -> VM:
        return self._do(_Calls.get(vm_id))

    def list_vms(
        self, labels: Mapping[str, str] | None = None, statuses: Sequence[Status | str] = ()
    ) -> list[VM]:
        """Every VM, or those with every one of ``labels`` and one of ``statuses`` (a
        ``Status`` or its name; an unknown name is the server's ``invalid-request``)."""
        return self._do(_Calls.list_vms(labels, statuses))

    def update(self, vm_id: str, change: UpdateVMRequest) -> VM:
        """Renew the VM's lease or replace its labels (``PATCH``)."""
        return self._do(_Calls.update(vm_id, change))

    def delete(self, vm_id: str) -> None:
        self._do(_Calls.delete(vm_id))

    def images(self) -> list[Image]:
        return self._do(_Calls.images())

    def pull_image(self, spec: ImageSpec) -> Image:
        return self._do(_Calls.pull_image(spec))

    def delete_image(self, image_id: str) -> None:
        self._do(_Calls.delete_image(image_id))

    def hosts(self) -> list[Host]:
        return self._do(_Calls.hosts())

    def forget_host(self, host_id: str) -> None:
        self._do(_Calls.forget_host(host_id))

    def wait_until_running(
        self, vm_id: str, timeout: float = 600.0, on_update: Callable[[VM], None] | None = None
    ) -> VM:
        """Wait until the VM runs with an IP; raises ``VMFailed`` or ``WaitTimeout``."""
        waiter = _Waiter(vm_id, timeout, on_update)
        while not waiter.settled(vm := self._do(waiter.call())):
            pass
        return vm

    def wait_until_ready(
        self,
        image_id: str,
        timeout: float = 600.0,
        on_update: Callable[[Image], None] | None = None,
    ) -> Image:
        """Wait until the image is ready; raises ``ImageFailed`` or ``WaitTimeout``."""
        waiter = _ImageWaiter(image_id, timeout, on_update)
        while (image := waiter.settled(self.images())) is None:
            time.sleep(waiter.POLL)
        return image

    def console(self, vm_id: str, follow: bool = False) -> Iterator[str]:
        """The VM's serial console so far, in pieces of text; with ``follow``, what the guest
        writes next too, until the VM is gone."""
        try:
            with self._http.stream(**_console_request(vm_id, follow, self._timeout)) as response:
                if response.is_error:
                    raise _error_of(response.status_code, response.read())
                yield from response.iter_text()
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"cannot reach {self._http.base_url}: {exc}") from exc


class AsyncClient:
    """The goldclone API over HTTP, for asyncio. Use it as an async context manager."""

    def __init__(
        self,
        url: str | None = None,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._timeout = timeout
        self._http = httpx.AsyncClient(
            base_url=url or default_url(), headers=_auth_headers(token), timeout=timeout,
            transport=transport,
        )  # fmt: skip

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _do(self, call: _Call[T]) -> T:
        try:
            response = await self._http.request(**call.request(self._timeout))
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"cannot reach {self._http.base_url}: {exc}") from exc
        return call.result(response)

    async def create(self, request: CreateVMRequest) -> VM:
        return await self._do(_Calls.create(request))

    async def get(self, vm_id: str) -> VM:
        return await self._do(_Calls.get(vm_id))

    async def list_vms(
        self, labels: Mapping[str, str] | None = None, statuses: Sequence[Status | str] = ()
    ) -> list[VM]:
        """Every VM, or those with every one of ``labels`` and one of ``statuses`` (a
        ``Status`` or its name; an unknown name is the server's ``invalid-request``)."""
        return await self._do(_Calls.list_vms(labels, statuses))

    async def update(self, vm_id: str, change: UpdateVMRequest) -> VM:
        """Renew the VM's lease or replace its labels (``PATCH``)."""
        return await self._do(_Calls.update(vm_id, change))

    async def delete(self, vm_id: str) -> None:
        await self._do(_Calls.delete(vm_id))

    async def images(self) -> list[Image]:
        return await self._do(_Calls.images())

    async def pull_image(self, spec: ImageSpec) -> Image:
        return await self._do(_Calls.pull_image(spec))

    async def delete_image(self, image_id: str) -> None:
        await self._do(_Calls.delete_image(image_id))

    async def hosts(self) -> list[Host]:
        return await self._do(_Calls.hosts())

    async def forget_host(self, host_id: str) -> None:
        await self._do(_Calls.forget_host(host_id))

    async def wait_until_running(
        self, vm_id: str, timeout: float = 600.0, on_update: Callable[[VM], None] | None = None
    ) -> VM:
        """Wait until the VM runs with an IP; raises ``VMFailed`` or ``WaitTimeout``."""
        waiter = _Waiter(vm_id, timeout, on_update)
        while not waiter.settled(vm := await self._do(waiter.call())):
            pass
        return vm

    async def wait_until_ready(
        self,
        image_id: str,
        timeout: float = 600.0,
        on_update: Callable[[Image], None] | None = None,
    ) -> Image:
        """Wait until the image is ready; raises ``ImageFailed`` or ``WaitTimeout``."""
        waiter = _ImageWaiter(image_id, timeout, on_update)
        while (image := waiter.settled(await self.images())) is None:
            await asyncio.sleep(waiter.POLL)
        return image

    async def console(self, vm_id: str, follow: bool = False) -> AsyncIterator[str]:
        """The VM's serial console so far, in pieces of text; with ``follow``, what the guest
        writes next too, until the VM is gone."""
        try:
            async with self._http.stream(
                **_console_request(vm_id, follow, self._timeout)
            ) as response:
                if response.is_error:
                    raise _error_of(response.status_code, await response.aread())
                async for text in response.aiter_text():
                    yield text
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"cannot reach {self._http.base_url}: {exc}") from exc
