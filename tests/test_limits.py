"""Host totals, idempotency keys, and a burst of creates against a limit, on real guests."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

from goldclone.settings import Settings
from tests.conftest import checksum
from tests.harness import Goldclone, goldclone_server, leftovers, processes_mentioning
from tests.servers import FileServer


def stalled(file_server: FileServer, demo_package: Path, **changes: Any) -> dict[str, Any]:
    """A request whose download never ends, so its VM stays ``creating`` and holds capacity."""
    image = {"url": file_server.url(f"stall/{demo_package.name}"),
             "checksum": checksum(demo_package)}  # fmt: skip
    return {"cpus": 1, "memory": 128, "image": image} | changes


def limited(settings: Settings, **totals: int) -> Settings:
    return dataclasses.replace(settings, limits=dataclasses.replace(settings.limits, **totals))


async def test_an_idempotency_key_returns_the_same_vm(
    goldclone: Goldclone, file_server: FileServer, demo_package: Path
) -> None:
    body = stalled(file_server, demo_package)
    key = {"Idempotency-Key": "build-4711"}
    first = await goldclone.client.post("/vms", json=body, headers=key)
    again = await goldclone.client.post("/vms", json=body, headers=key)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]

    other = await goldclone.client.post("/vms", json={**body, "cpus": 2}, headers=key)
    assert other.status_code == 409 and other.json()["code"] == "idempotency-conflict"
    fresh = await goldclone.client.post("/vms", json=body, headers={"Idempotency-Key": "4712"})
    assert fresh.json()["id"] != first.json()["id"]
    assert len((await goldclone.client.get("/vms")).json()["vms"]) == 2

    await goldclone.delete(first.json()["id"])
    reused = await goldclone.client.post("/vms", json=body, headers=key)
    assert reused.status_code == 202 and reused.json()["id"] != first.json()["id"]

    too_long = await goldclone.client.post(
        "/vms", json=body, headers={"Idempotency-Key": "k" * 256}
    )
    assert too_long.status_code == 400


async def test_host_totals_refuse_with_409_before_allocating(
    settings: Settings, file_server: FileServer, demo_package: Path
) -> None:
    async with goldclone_server(limited(settings, total_cpus=3, total_memory_mb=1024)) as gc:
        assert (await gc.client.post("/vms", json=stalled(file_server, demo_package, cpus=2))
                ).status_code == 202  # fmt: skip
        over_cpus = await gc.client.post("/vms", json=stalled(file_server, demo_package, cpus=2))
        assert over_cpus.status_code == 409
        assert over_cpus.json()["code"] == "capacity-exceeded"
        assert "vCPUs" in over_cpus.json()["message"]
        over_memory = await gc.client.post(
            "/vms", json=stalled(file_server, demo_package, memory=1000)
        )
        assert over_memory.status_code == 409 and "memory" in over_memory.json()["message"]
        assert len((await gc.client.get("/vms")).json()["vms"]) == 1
        assert list((gc.data_dir / "vms").glob("*")) == []


async def test_twenty_creates_against_a_limit_of_eight(
    settings: Settings, file_server: FileServer, demo_package: Path
) -> None:
    image = {"url": file_server.url(demo_package.name), "checksum": checksum(demo_package)}
    body = {"cpus": 1, "memory": 128, "image": image}
    async with goldclone_server(limited(settings, max_vms=8)) as goldclone:
        answers = await asyncio.gather(
            *(goldclone.client.post("/vms", json=body) for _ in range(20))
        )
        accepted = [a.json() for a in answers if a.status_code == 202]
        refused = [a.json() for a in answers if a.status_code == 409]
        assert (len(accepted), len(refused)) == (8, 12)
        assert {r["code"] for r in refused} == {"capacity-exceeded"}

        vms = [await goldclone.wait_for(vm["id"], "running", "error") for vm in accepted]
        assert [vm["status"] for vm in vms] == ["running"] * 8
        assert len({vm["ip_address"] for vm in vms}) == 8
        # QEMU itself, not the shell that waits for it (whose command line is QEMU's too)
        qemus = [
            pid
            for pid in processes_mentioning(str(goldclone.data_dir.absolute()))
            if b"qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        ]
        assert len(qemus) == 8 == len((await goldclone.client.get("/vms")).json()["vms"])

        refused_now = await goldclone.client.post("/vms", json=body)
        assert refused_now.status_code == 409
        await goldclone.delete(vms[0]["id"])
        assert leftovers(goldclone.data_dir, vms[0]) == []
        assert (await goldclone.client.post("/vms", json=body)).status_code == 202
