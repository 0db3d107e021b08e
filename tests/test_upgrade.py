"""Upgrades keep data: a data dir made by an earlier release works with this code, and a store
made by a newer one is refused without being touched."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import sys
import tarfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from goldclone.errors import SchemaTooNew
from goldclone.server import build_service
from goldclone.settings import Settings
from goldclone.store.schema import head
from tests.conftest import checksum
from tests.harness import goldclone_server, leftovers
from tests.servers import FileServer, free_port

pytestmark = pytest.mark.root

BEFORE_MIGRATIONS = "8682a97"
"""The last commit whose store had no migrations."""
RELEASE = Path(__file__).parent / "data" / f"release-{BEFORE_MIGRATIONS}-src.tar.gz"


@pytest.fixture(scope="module")
def old_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """goldclone's source as it was at ``BEFORE_MIGRATIONS``: ``git archive`` of that commit,
    kept in tests/data so that a shallow clone can run the test too."""
    root = tmp_path_factory.mktemp("old-release")
    with tarfile.open(RELEASE) as tar:
        tar.extractall(root, filter="data")
    return root / "src"


async def _old_server_makes_a_vm(
    old_src: Path, data_dir: Path, body: dict[str, Any]
) -> dict[str, Any]:
    """Serve ``data_dir`` with the old release, boot a VM there, and stop the old server,
    leaving the VM running as any restart would."""
    port = free_port()
    env = os.environ | {"PYTHONPATH": str(old_src), "GOLDCLONE_SHUTDOWN_TIMEOUT": "5"}
    log = (data_dir.parent / f"{data_dir.name}-old.log").open("wb")
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "goldclone.cli", "serve", "--port", str(port),
        "--data-dir", str(data_dir), env=env, stdout=log, stderr=log,
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            async with asyncio.timeout(60):
                while True:
                    assert server.returncode is None, "the old server exited; see its log"
                    try:
                        await client.get("/vms")
                        break
                    except httpx.TransportError:
                        await asyncio.sleep(0.1)
            created = (await client.post("/vms", json=body)).json()
            async with asyncio.timeout(180):
                while (vm := (await client.get(f"/vms/{created['id']}")).json())[
                    "status"
                ] == "creating":
                    await asyncio.sleep(0.2)
        assert vm["status"] == "running", vm
        return vm
    finally:
        if server.returncode is None:
            server.terminate()
        await asyncio.wait_for(server.wait(), 30)
        log.close()


async def test_a_data_dir_of_the_release_before_migrations_upgrades_in_place(
    old_release: Path, settings: Settings, file_server: FileServer, demo_package: Path
) -> None:
    body = {"image": {"url": file_server.url(demo_package.name),
                      "checksum": checksum(demo_package)}, "cpus": 1, "memory": 256}  # fmt: skip
    before = await _old_server_makes_a_vm(old_release, settings.data_dir, body)
    db = sqlite3.connect(settings.data_dir / "state.db")
    assert [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")] == [
        "vms"
    ]
    db.close()

    async with goldclone_server(settings) as server:
        after = (await server.client.get(f"/vms/{before['id']}")).json()
        assert after["status"] == "running"
        assert (after["ip_address"], after["mac_address"]) == (
            before["ip_address"],
            before["mac_address"],
        )
        async with httpx.AsyncClient(timeout=10) as guest:
            page = await guest.get(f"http://{after['ip_address']}/")
        assert before["mac_address"] in page.text
        images = (await server.client.get("/images")).json()["images"]
        sha256 = checksum(demo_package)
        assert [(i["id"], i["status"], i["checksums"]) for i in images] == [
            (f"sha256-{sha256}", "ready", {"sha256": sha256})
        ]
        # the old release's gold image is known by its content: another checksum of the same
        # package names it, and makes no second copy
        md5 = checksum(demo_package, "md5")
        pulled = await server.client.post("/images", json={**body["image"], "checksum": md5,
                                                           "checksum_type": "md5"})  # fmt: skip
        assert pulled.status_code == 202, pulled.text
        async with asyncio.timeout(60):
            while (images := (await server.client.get("/images")).json()["images"]) and any(
                i["status"] == "downloading" for i in images
            ):
                await asyncio.sleep(0.1)
        assert [(i["id"], i["checksums"]) for i in images] == [
            (f"sha256-{sha256}", {"md5": md5, "sha256": sha256})
        ]
        assert [p.name for p in (settings.data_dir / "images").iterdir()] == [f"sha256-{sha256}"]
        db = sqlite3.connect(settings.data_dir / "state.db")
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(head(),)]
        db.close()
        await server.delete(before["id"])
        assert leftovers(settings.data_dir, after) == []


async def test_a_store_from_a_newer_goldclone_is_refused_untouched(settings: Settings) -> None:
    service = build_service(settings)
    await service.start()
    await service.close()
    db_path = settings.data_dir / "state.db"
    db = sqlite3.connect(db_path)
    with db:
        db.execute("UPDATE alembic_version SET version_num = '9999'")
    db.close()
    digest = hashlib.sha256(db_path.read_bytes()).hexdigest()

    refused = build_service(settings)
    with pytest.raises(SchemaTooNew, match="revision 9999, which this goldclone"):
        await refused.start()
    assert hashlib.sha256(db_path.read_bytes()).hexdigest() == digest
