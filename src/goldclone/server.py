"""Assembling the service from its settings, and serving it."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from goldclone import logs
from goldclone.access import Access
from goldclone.api import create_app
from goldclone.drivers.base import Driver
from goldclone.errors import AddressUnavailable, StartFailed
from goldclone.models import VM
from goldclone.outbound.policy import OutboundPolicy, PolicyTransport
from goldclone.service import VMService, journal
from goldclone.service.fleet import host_id_of
from goldclone.service.metrics import Metrics
from goldclone.settings import Settings
from goldclone.store.database import Database

log = logging.getLogger(__name__)


def build_service(settings: Settings, driver: Driver | None = None) -> VMService:
    """Wire the embedded defaults: SQLite (or ``database_url``), and the driver that
    ``settings.driver`` names (QEMU with owned networks by default), unless one is given."""
    data_dir = settings.data_dir.absolute()
    data_dir.mkdir(parents=True, exist_ok=True)
    policy = OutboundPolicy(allow_private=settings.allow_private_urls)
    http = httpx.AsyncClient(follow_redirects=True, transport=PolicyTransport(policy))
    metrics = Metrics(settings.limits)

    def phase_added(vm: VM) -> None:
        metrics.phase_added(vm)
        journal.phase_added(vm)

    db = Database(settings.db_url, host_id_of(settings), phase_added, settings.store_pool)
    driver = driver or build_driver(settings, data_dir)
    return VMService(settings, db, driver, http, metrics)


def build_driver(settings: Settings, data_dir: Path) -> Driver:
    """The driver that ``settings.driver`` names; each is imported only when it is chosen."""
    if settings.driver == "vmware":
        from goldclone.drivers.vmware import VMwareDriver

        return VMwareDriver(data_dir, settings.vmware, settings.shutdown_timeout)
    if settings.driver == "qemu":
        from goldclone.drivers.qemu import QemuDriver
        from goldclone.drivers.qemu.bounds import DiskRate
        from goldclone.drivers.qemu.network import Networks

        return QemuDriver(
            data_dir,
            Networks(settings.network, data_dir / "networks"),
            settings.qemu_binary,
            settings.accel,
            settings.shutdown_timeout,
            settings.qemu_user,
            settings.qemu_memory_overhead,
            settings.qemu_tcg_cache,
            settings.console_max * 1024 * 1024,
            DiskRate(settings.qemu_disk_mbps, settings.qemu_disk_iops),
        )
    if settings.driver == "synthetic":
        from goldclone.drivers.synthetic import SyntheticDriver

        return SyntheticDriver(data_dir)
    raise ValueError(f"unknown driver {settings.driver!r}; use one of qemu, vmware, synthetic")


WEBSOCKETS = "websockets-sansio"
"""uvicorn's WebSocket implementation: websockets' sans-I/O one (its "auto" picks the
deprecated legacy one)."""


def build_app(
    settings: Settings, demo_dir: Path | None = None, driver: Driver | None = None
) -> FastAPI:
    """The API app; with ``demo_dir``, its files are served under ``/demo/`` as well."""
    return _app_for(build_service(settings, driver), settings, demo_dir)


def _app_for(service: VMService, settings: Settings, demo_dir: Path | None) -> FastAPI:
    app = create_app(service, settings.max_body_bytes, access_of(settings), settings.limits,
                     settings.fleet_secret)  # fmt: skip
    if demo_dir is not None:
        app.mount("/demo", StaticFiles(directory=demo_dir), name="demo")
    return app


KEEP_ALIVE = 75
"""Seconds an idle client connection is kept open: longer than clients keep theirs (httpx, and
so goldclone's own client, 5 s). At uvicorn's default, also 5 s, a request that a client sends
on a connection just as its idle time runs out can be cut off ("Server disconnected without
sending a response")."""


def access_of(settings: Settings) -> Access:
    """The tokens that ``settings`` name, and who each is."""
    return Access(settings.tokens, settings.api_tokens, settings.metrics_tokens)


def listen(settings: Settings) -> socket.socket:
    """A socket listening on the API's address, taken before anything else is done, so that
    an address in use is said at once (``AddressUnavailable``). It is made as TCP by name
    (``IPPROTO_TCP``), as uvicorn's own would be: only then does asyncio turn Nagle's
    algorithm off, which otherwise holds each answer back about 40 ms."""
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            settings.host, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise AddressUnavailable(
            f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"
        ) from None
    return sock


BACKLOG = 2048
"""Connections that may wait to be accepted, as uvicorn's default."""


def serve(settings: Settings, listening: socket.socket, demo_dir: Path | None = None) -> None:
    """Serve the API on ``listening`` until a signal stops it. Raises ``StartFailed`` if the
    service did not start (the log says why)."""
    logs.configure(settings.log_format, settings.log_level)
    if access_of(settings).open and not _is_loopback(settings.host):
        log.warning(
            "*** goldclone is listening on %s WITHOUT authentication: anyone who can reach it "
            "can create VMs and make this host fetch URLs. Set tokens (docs/api.md). ***",
            settings.host,
        )
    service = build_service(settings)
    asyncio.run(service.claim())  # before anything is served, so that a refusal is one line
    app = _app_for(service, settings, demo_dir)
    config = uvicorn.Config(
        app, log_config=None, access_log=False, timeout_keep_alive=KEEP_ALIVE, ws=WEBSOCKETS
    )
    server = uvicorn.Server(config)
    log.info("serving the API on http://%s:%d", settings.host, settings.port)
    server.run(sockets=[listening])
    if not server.started:
        raise StartFailed("the service did not start; the lines above say why")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
