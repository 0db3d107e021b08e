"""A typed Python client for the goldclone API, synchronous (``Client``) and asynchronous
(``AsyncClient``). Both speak through the API's own models, so a request that the server would
refuse as malformed is refused here before it is sent; its errors are in
``goldclone.client.errors``, and importable from here."""

from __future__ import annotations

import asyncio
import os
import posixpath
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

import httpx

from goldclone.client.calls import Call, Calls, ImageWaiter, VMWaiter, console_request
from goldclone.client.errors import (
    APIError,
    ClientError,
    Failed,
    ImageFailed,
    ServerUnreachable,
    VMFailed,
    WaitTimeout,
    error_of,
)
from goldclone.client.exec import Completed, ExecSession
from goldclone.client.exec import run as exec_run
from goldclone.client.files import guest_target, pack, unpack
from goldclone.exec_protocol import ExecRequest
from goldclone.image_spec import ImageSpec
from goldclone.models import (
    VM,
    CreateVMRequest,
    Host,
    Image,
    ImageBuild,
    ImagePush,
    Pool,
    PoolRequest,
    Pushed,
    Status,
    Template,
    TemplateRequest,
    UpdateVMRequest,
)

__all__ = [
    "APIError", "AsyncClient", "Client", "ClientError", "Failed", "ImageFailed",
    "ServerUnreachable", "VMFailed", "WaitTimeout", "default_url",
]  # fmt: skip

DEFAULT_URL = "http://127.0.0.1:12345"
T = TypeVar("T")


def default_url() -> str:
    """``GOLDCLONE_URL``, or the server's default address."""
    return os.environ.get("GOLDCLONE_URL") or DEFAULT_URL


def _auth_headers(token: str | None) -> dict[str, str]:
    """The bearer token given, or ``GOLDCLONE_TOKEN``, as a header; none without either."""
    token = token or os.environ.get("GOLDCLONE_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _auth_of(headers: httpx.Headers) -> dict[str, str]:
    """Of an HTTP client's headers, the one a WebSocket takes too (its own ``Connection``
    and the like must not be overridden)."""
    return {"Authorization": headers["Authorization"]} if "Authorization" in headers else {}


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

    def _do(self, call: Call[T]) -> T:
        try:
            response = self._http.request(**call.request(self._timeout))
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"cannot reach {self._http.base_url}: {exc}") from exc
        return call.result(response)

    def create(self, request: CreateVMRequest) -> VM:
        return self._do(Calls.create(request))

    def get(self, vm_id: str) -> VM:
        return self._do(Calls.get(vm_id))

    def list_vms(
        self, labels: Mapping[str, str] | None = None, statuses: Sequence[Status | str] = ()
    ) -> list[VM]:
        """Every VM, or those with every one of ``labels`` and one of ``statuses`` (a
        ``Status`` or its name; an unknown name is the server's ``invalid-request``)."""
        return self._do(Calls.list_vms(labels, statuses))

    def update(self, vm_id: str, change: UpdateVMRequest) -> VM:
        """Renew the VM's lease or replace its labels (``PATCH``)."""
        return self._do(Calls.update(vm_id, change))

    def delete(self, vm_id: str) -> None:
        self._do(Calls.delete(vm_id))

    def images(self) -> list[Image]:
        return self._do(Calls.images())

    def pull_image(self, spec: ImageSpec) -> Image:
        return self._do(Calls.pull_image(spec))

    def make_image(self, vm_id: str, build: ImageBuild) -> Image:
        return self._do(Calls.make_image(vm_id, build))

    def push_image(self, image_id: str, push: ImagePush) -> Pushed:
        return self._do(Calls.push_image(image_id, push))

    def delete_image(self, image_id: str) -> None:
        self._do(Calls.delete_image(image_id))

    def hosts(self) -> list[Host]:
        return self._do(Calls.hosts())

    def forget_host(self, host_id: str) -> None:
        self._do(Calls.forget_host(host_id))

    def image(self, image_id: str) -> Image:
        """One gold image, by any of its IDs."""
        return self._do(Calls.image(image_id))

    def templates(self, image_id: str) -> list[Template]:
        """The image's memory templates on the host that answers."""
        return self._do(Calls.templates(image_id))

    def create_template(self, image_id: str, request: TemplateRequest) -> Template:
        """Start making a memory template (or the one of that shape there is)."""
        return self._do(Calls.create_template(image_id, request))

    def delete_template(self, image_id: str, template_id: str) -> None:
        self._do(Calls.delete_template(image_id, template_id))

    def pools(self) -> list[Pool]:
        return self._do(Calls.pools())

    def pool(self, name: str) -> Pool:
        return self._do(Calls.pool(name))

    def put_pool(self, name: str, request: PoolRequest) -> Pool:
        """Make the warm pool ``name``, or change it to ``request``."""
        return self._do(Calls.put_pool(name, request))

    def delete_pool(self, name: str) -> None:
        self._do(Calls.delete_pool(name))

    def wait_until_running(
        self, vm_id: str, timeout: float = 600.0, on_update: Callable[[VM], None] | None = None
    ) -> VM:
        """Wait until the VM runs with an IP; raises ``VMFailed`` or ``WaitTimeout``."""
        waiter = VMWaiter(vm_id, timeout, on_update)
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
        waiter = ImageWaiter(image_id, timeout, on_update)
        while (image := waiter.settled(self.images())) is None:
            time.sleep(waiter.POLL)
        return image

    def exec(self, vm_id: str, request: ExecRequest, stdin: bytes = b"") -> Completed:
        """Run a command in the VM's guest to its end (``client.exec.run``)."""
        return asyncio.run(exec_run(*self.websocket_target(), vm_id, request, stdin))

    def websocket_target(self) -> tuple[str, dict[str, str]]:
        """The API's URL, and the headers a WebSocket to it needs (``client.exec``)."""
        return str(self._http.base_url), _auth_of(self._http.headers)

    def copy_to(self, vm_id: str, local: Path, remote: str) -> None:
        """Copy the file or folder ``local`` to the guest's ``remote`` (into it, with its own
        name, when ``remote`` ends with ``/``), modes kept."""
        folder, name = guest_target(remote, local)
        with pack(local, name) as tar:
            request = self._http.build_request(
                "PUT", f"/vms/{quote(vm_id, safe='')}/files", params={"path": folder},
                content=tar, headers={"Content-Type": "application/x-tar"},
            )  # fmt: skip
            self._send(request)

    def copy_from(self, vm_id: str, remote: str, local: Path) -> Path:
        """Copy the guest's file or folder ``remote`` to ``local`` (into it, if it is a
        folder), modes kept; returns where it went. ``client.files.UnsafeArchive`` if what the guest
        sent would reach elsewhere."""
        name = posixpath.basename(posixpath.normpath(remote))
        url = f"/vms/{quote(vm_id, safe='')}/files"
        try:
            with self._http.stream("GET", url, params={"path": remote}) as response:
                if response.is_error:
                    raise error_of(response.status_code, response.read())
                return unpack(response.iter_bytes(), name, local)
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"cannot reach {self._http.base_url}: {exc}") from exc

    def _send(self, request: httpx.Request) -> None:
        try:
            response = self._http.send(request)
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"cannot reach {self._http.base_url}: {exc}") from exc
        if response.is_error:
            raise error_of(response.status_code, response.content)

    def console(self, vm_id: str, follow: bool = False) -> Iterator[str]:
        """The VM's serial console so far, in pieces of text; with ``follow``, what the guest
        writes next too, until the VM is gone."""
        try:
            with self._http.stream(**console_request(vm_id, follow, self._timeout)) as response:
                if response.is_error:
                    raise error_of(response.status_code, response.read())
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

    async def exec(self, vm_id: str, request: ExecRequest, stdin: bytes = b"") -> Completed:
        """Run a command in the VM's guest to its end (``client.exec.run``)."""
        return await exec_run(*self.websocket_target(), vm_id, request, stdin)

    async def exec_session(self, vm_id: str, request: ExecRequest) -> ExecSession:
        """Start a command in the VM's guest, to stream its input and output."""
        return await ExecSession.open(*self.websocket_target(), vm_id, request)

    def websocket_target(self) -> tuple[str, dict[str, str]]:
        """The API's URL, and the headers a WebSocket to it needs (``client.exec``)."""
        return str(self._http.base_url), _auth_of(self._http.headers)

    async def _do(self, call: Call[T]) -> T:
        try:
            response = await self._http.request(**call.request(self._timeout))
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"cannot reach {self._http.base_url}: {exc}") from exc
        return call.result(response)

    async def create(self, request: CreateVMRequest) -> VM:
        return await self._do(Calls.create(request))

    async def get(self, vm_id: str) -> VM:
        return await self._do(Calls.get(vm_id))

    async def list_vms(
        self, labels: Mapping[str, str] | None = None, statuses: Sequence[Status | str] = ()
    ) -> list[VM]:
        """Every VM, or those with every one of ``labels`` and one of ``statuses`` (a
        ``Status`` or its name; an unknown name is the server's ``invalid-request``)."""
        return await self._do(Calls.list_vms(labels, statuses))

    async def update(self, vm_id: str, change: UpdateVMRequest) -> VM:
        """Renew the VM's lease or replace its labels (``PATCH``)."""
        return await self._do(Calls.update(vm_id, change))

    async def delete(self, vm_id: str) -> None:
        await self._do(Calls.delete(vm_id))

    async def images(self) -> list[Image]:
        return await self._do(Calls.images())

    async def pull_image(self, spec: ImageSpec) -> Image:
        return await self._do(Calls.pull_image(spec))

    async def make_image(self, vm_id: str, build: ImageBuild) -> Image:
        return await self._do(Calls.make_image(vm_id, build))

    async def push_image(self, image_id: str, push: ImagePush) -> Pushed:
        return await self._do(Calls.push_image(image_id, push))

    async def delete_image(self, image_id: str) -> None:
        await self._do(Calls.delete_image(image_id))

    async def hosts(self) -> list[Host]:
        return await self._do(Calls.hosts())

    async def forget_host(self, host_id: str) -> None:
        await self._do(Calls.forget_host(host_id))

    async def image(self, image_id: str) -> Image:
        """One gold image, by any of its IDs."""
        return await self._do(Calls.image(image_id))

    async def templates(self, image_id: str) -> list[Template]:
        """The image's memory templates on the host that answers."""
        return await self._do(Calls.templates(image_id))

    async def create_template(self, image_id: str, request: TemplateRequest) -> Template:
        """Start making a memory template (or the one of that shape there is)."""
        return await self._do(Calls.create_template(image_id, request))

    async def delete_template(self, image_id: str, template_id: str) -> None:
        await self._do(Calls.delete_template(image_id, template_id))

    async def pools(self) -> list[Pool]:
        return await self._do(Calls.pools())

    async def pool(self, name: str) -> Pool:
        return await self._do(Calls.pool(name))

    async def put_pool(self, name: str, request: PoolRequest) -> Pool:
        """Make the warm pool ``name``, or change it to ``request``."""
        return await self._do(Calls.put_pool(name, request))

    async def delete_pool(self, name: str) -> None:
        await self._do(Calls.delete_pool(name))

    async def wait_until_running(
        self, vm_id: str, timeout: float = 600.0, on_update: Callable[[VM], None] | None = None
    ) -> VM:
        """Wait until the VM runs with an IP; raises ``VMFailed`` or ``WaitTimeout``."""
        waiter = VMWaiter(vm_id, timeout, on_update)
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
        waiter = ImageWaiter(image_id, timeout, on_update)
        while (image := waiter.settled(await self.images())) is None:
            await asyncio.sleep(waiter.POLL)
        return image

    async def console(self, vm_id: str, follow: bool = False) -> AsyncIterator[str]:
        """The VM's serial console so far, in pieces of text; with ``follow``, what the guest
        writes next too, until the VM is gone."""
        try:
            async with self._http.stream(
                **console_request(vm_id, follow, self._timeout)
            ) as response:
                if response.is_error:
                    raise error_of(response.status_code, await response.aread())
                async for text in response.aiter_text():
                    yield text
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"cannot reach {self._http.base_url}: {exc}") from exc
