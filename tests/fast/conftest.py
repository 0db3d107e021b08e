"""The fast tests: the real API and service, in-process through httpx's ASGI transport, on the
synthetic driver. Images are real packages (a bare raw disk) downloaded from a real HTTP server
on loopback, kept in a real gold cache, with state in real SQLite. No root, no QEMU."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from goldclone.access import Role, Token, digest_of
from goldclone.drivers.synthetic import SyntheticDriver, SyntheticHost
from goldclone.server import build_app
from goldclone.settings import Settings
from tests.conftest import sqlite_copy
from tests.harness import ApiCalls, Goldclone, cli, goldclone_server
from tests.servers import FileServer

DISK = "disk.raw"
SECRETS = {
    "alice": ("alice-secret-0123456789", Role.USER, "team-a"),
    "alice-reader": ("alice-reader-secret-012", Role.READ, "team-a"),
    "bob": ("bob-secret-0123456789ab", Role.USER, "team-b"),
    "ops": ("ops-secret-0123456789ab", Role.OPERATOR, "ops"),
    "root": ("root-secret-0123456789a", Role.ADMIN, "default"),
    "scraper": ("scraper-secret-0123456", Role.METRICS, "scraper"),
}
LEGACY_API, LEGACY_METRICS = "a-legacy-api-token-0123", "a-legacy-metrics-token-0"


def tokens() -> tuple[Token, ...]:
    return tuple(Token(name, digest_of(secret), role, tenant)
                 for name, (secret, role, tenant) in SECRETS.items())  # fmt: skip


def as_(name: str) -> dict[str, str]:
    secret = {"legacy-api": LEGACY_API, "legacy-metrics": LEGACY_METRICS}.get(name)
    return {"Authorization": f"Bearer {secret or SECRETS[name][0]}"}


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FileServer]:
    """Serves ``disk.raw``: 64 KiB with an MBR signature, the smallest package the image
    checks take, and ``other.raw`` and ``third.raw``, two more images."""
    root = tmp_path_factory.mktemp("served")
    for name, fill in ((DISK, b"\0"), ("other.raw", b"\1"), ("third.raw", b"\2")):
        disk = bytearray(fill * 65536)
        disk[510:512] = b"\x55\xaa"
        (root / name).write_bytes(bytes(disk))
    with FileServer(root).running() as server:
        yield server


def image_of(server: FileServer, name: str = DISK) -> dict[str, str]:
    digest = hashlib.sha256((server.root / name).read_bytes()).hexdigest()
    return {"url": server.url(name), "checksum": digest}


@pytest.fixture
def request_body(images: FileServer) -> dict[str, Any]:
    return {"image": image_of(images), "cpus": 1, "memory": 256}


class Service(ApiCalls):
    """One goldclone service in this process, on a synthetic host, seen through its API."""

    poll = 0.01

    def __init__(self, settings: Settings, host: SyntheticHost | None = None) -> None:
        self.settings = settings
        self.host = host or SyntheticHost()
        self.driver = SyntheticDriver(settings.data_dir, self.host)

    def leftovers(self, vm_id: str) -> list[str]:
        found = []
        if vm_id in self.host.machines:
            found.append("its machine")
        if (self.settings.data_dir / "vms" / vm_id).exists():
            found.append("its folder")
        return found


@asynccontextmanager
async def serving(service: Service) -> AsyncIterator[Service]:
    """The service started (its lifespan run) with an ASGI client on it; closed on exit."""
    app = build_app(service.settings, driver=service.driver)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://goldclone") as client:
            service.client = client
            yield service


@pytest.fixture
def fast_settings(tmp_path: Path, database_url: str) -> Settings:
    """The service's settings, on each kind of database (``database_url``)."""
    return settings_on(tmp_path, database_url)


def settings_on(folder: Path, database_url: str) -> Settings:
    return Settings(
        data_dir=folder / "data",
        database_url=database_url,
        ip_timeout=5.0,
        download_timeout=5.0,
        callback_schedule=(0, 0.05, 0.1),
    )


@pytest.fixture
async def service(fast_settings: Settings) -> AsyncIterator[Service]:
    async with serving(Service(fast_settings)) as started:
        yield started


# A server on loopback (WebSockets need one) whose synthetic guests are goldclone's real helper
# run on this host, with tokens (tests/fast/test_access.py) and alice's on its client.
@pytest.fixture
async def helper_server(tmp_path: Path, migrated_sqlite: Path) -> AsyncIterator[Goldclone]:
    """On SQLite only: exec and files touch the store only to find the VM."""
    database = sqlite_copy(migrated_sqlite, tmp_path)
    settings = dataclasses.replace(settings_on(tmp_path, database), tokens=tokens())
    driver = SyntheticDriver(settings.data_dir, SyntheticHost(runs_commands=True))
    async with goldclone_server(settings, driver) as started:
        started.client.headers.update(as_("alice"))
        yield started


@pytest.fixture
async def helper_vm(helper_server: Goldclone, request_body: dict[str, Any]) -> str:
    created = await helper_server.post_vm(request_body)
    await helper_server.wait_for(created["id"], "running")
    return str(created["id"])


async def goldclone_cli(
    server: Goldclone, *args: str, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    """The ``goldclone`` command as alice."""
    return await cli(server, *args, stdin=stdin, token=as_("alice")["Authorization"][7:])
