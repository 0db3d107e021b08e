"""Gold images as users see them: one per package whatever checksums it is asked by, a failed
fetch that blocks nothing, and VMs that say whether their image came from the cache."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from goldclone.images import cache
from goldclone.images.cache import ImageCache
from goldclone.settings import Settings
from goldclone.store import event_log
from goldclone.store.event_log import EventKind
from tests.fast.conftest import DISK, Service, serving
from tests.servers import CallbackReceiver, FileServer


def phases(vm: dict[str, Any]) -> list[str]:
    return [entry["phase"] for entry in vm["timeline"]]


def fresh_copy(images: FileServer, name: str = DISK) -> str:
    """The same package under a name of its own, so that its downloads can be counted."""
    copy = f"{uuid.uuid4().hex}.raw"
    (images.root / copy).write_bytes((images.root / name).read_bytes())
    return copy


def spec(images: FileServer, name: str, kind: str) -> dict[str, str]:
    digest = hashlib.new(kind, (images.root / name).read_bytes()).hexdigest()
    return {"url": images.url(name), "checksum": digest, "checksum_type": kind}


def key(image: dict[str, str]) -> str:
    return f"{image['checksum_type']}-{image['checksum']}"


async def listed(service: Service) -> list[dict[str, Any]]:
    images: list[dict[str, Any]] = (await service.client.get("/images")).json()["images"]
    return images


async def pulled(service: Service, image: dict[str, str]) -> dict[str, Any]:
    """``POST /images`` of ``image``, and the gold image once its fetch has ended."""
    response = await service.client.post("/images", json=image)
    assert response.status_code == 202, response.text
    while True:
        found = [i for i in await listed(service) if i["checksums"].get(image["checksum_type"])
                 == image["checksum"] or i["id"] == key(image)]  # fmt: skip
        if found and found[0]["status"] != "downloading":
            return found[0]
        await asyncio.sleep(service.poll)


async def test_a_failed_download_leaves_no_image_that_blocks_anything(
    service: Service, images: FileServer, callbacks: CallbackReceiver
) -> None:
    missing = {**spec(images, DISK, "sha256"), "url": images.url("missing.raw")}
    body = {"image": missing, "cpus": 1, "memory": 256, "callback_url": callbacks.url}
    vm = await service.boot(body)
    assert vm["error"]["code"] == "download-failed"
    assert phases(vm) == ["accepted", "downloading", "error"]  # the download is on record
    (listed_vm,) = (await service.client.get("/vms")).json()["vms"]
    (told,) = await asyncio.to_thread(callbacks.wait_for, 1, 5)
    assert phases(listed_vm) == phases(told) == phases(vm) and vm["image_from_cache"] is None
    (image,) = await listed(service)
    assert (image["status"], image["vms"]) == ("error", 0)  # the failed VM holds nothing of it
    assert (await service.client.delete(f"/images/{image['id']}")).status_code == 204
    assert await listed(service) == []
    assert (await service.client.get(f"/vms/{vm['id']}")).json()["status"] == "error"

    running = await service.boot({"image": spec(images, DISK, "sha256"), "cpus": 1,
                                  "memory": 256})  # fmt: skip
    (image,) = await listed(service)
    assert (image["status"], image["vms"]) == ("ready", 1)
    refused = await service.client.delete(f"/images/{image['id']}")
    assert (refused.status_code, refused.json()["code"]) == (409, "image-in-use")
    await service.delete(running["id"])


async def test_a_failed_fetch_is_forgotten_after_a_while_and_says_so(
    service: Service, images: FileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache, "FAILED_KEPT", 0.5)
    missing = {**spec(images, DISK, "sha256"), "url": images.url("missing.raw")}
    assert (await pulled(service, missing))["status"] == "error"
    async with asyncio.timeout(10):
        while await listed(service):
            await asyncio.sleep(service.poll)
    engine = create_async_engine(service.settings.db_url)
    try:
        async with engine.connect() as conn:
            recorded, _ = await event_log.read_after(conn, 0, 500)
    finally:
        await engine.dispose()
    assert (EventKind.IMAGE_DELETED, key(missing)) in [(e.kind, e.subject) for e in recorded]
    again = await pulled(service, missing)  # asked for again: fetched again, and fails again
    assert again["status"] == "error" and again["id"] == key(missing)


async def test_a_vm_says_whether_its_image_came_from_the_cache(
    service: Service, images: FileServer
) -> None:
    image = spec(images, fresh_copy(images), "sha256")
    first = await service.boot({"image": image, "cpus": 1, "memory": 256})
    assert (first["status"], first["image_from_cache"]) == ("running", False)
    gone = {**image, "url": images.url("nowhere.raw")}  # the cache is content-addressed
    second = await service.boot({"image": gone, "cpus": 1, "memory": 256})
    assert (second["status"], second["image_from_cache"]) == ("running", True)
    assert "downloading" not in phases(second) and images.gets["nowhere.raw"] == 0


async def test_a_package_is_one_gold_image_whatever_checksums_name_it(
    fast_settings: Settings, images: FileServer
) -> None:
    name = fresh_copy(images)
    by = {kind: spec(images, name, kind) for kind in ("md5", "sha1", "sha256", "sha512")}
    async with serving(Service(fast_settings)) as service:
        first = await pulled(service, by["md5"])
        assert first["id"] == key(by["md5"]) and first["status"] == "ready"
        assert first["checksums"] == {"md5": by["md5"]["checksum"],
                                      "sha256": by["sha256"]["checksum"]}  # fmt: skip
        again = await pulled(service, by["sha512"])  # downloaded, verified, not unpacked
        assert again["id"] == first["id"] and images.gets[name] == 2
        vm = await service.boot({"image": by["sha1"], "cpus": 1, "memory": 256})
        assert vm["status"] == "running" and images.gets[name] == 3
        (image,) = await listed(service)
        assert image["id"] == first["id"] and image["vms"] == 1
        assert image["checksums"] == {kind: by[kind]["checksum"] for kind in by}
        gold = fast_settings.data_dir / "images"
        assert [path.name for path in gold.iterdir()] == [first["id"]]
        refused = await service.client.delete(f"/images/{key(by['sha512'])}")
        assert (refused.status_code, refused.json()["code"]) == (409, "image-in-use")
        await service.delete(vm["id"])

    async with serving(Service(fast_settings)) as restarted:  # what was verified is kept
        for kind in by:
            vm = await restarted.boot({"image": by[kind], "cpus": 1, "memory": 256})
            assert (vm["status"], vm["image_from_cache"]) == ("running", True), (kind, vm)
            await restarted.delete(vm["id"])
        assert images.gets[name] == 3
        assert (await restarted.client.delete(f"/images/{key(by['sha1'])}")).status_code == 204
        assert await listed(restarted) == [] and list(gold.iterdir()) == []


async def test_the_openapi_description_tells_of_the_cache(service: Service) -> None:
    schemas = (await service.client.get("/openapi.json")).json()["components"]["schemas"]
    assert "content-addressed" in schemas["VM"]["properties"]["image_from_cache"]["description"]
    assert "sha256" in schemas["Image"]["properties"]["checksums"]["description"]


async def test_images_used_one_after_the_other_are_ordered_even_within_a_clock_tick(
    tmp_path: Path,
) -> None:
    """The cache budget removes the least recently used image first: two used within one
    tick of the kernel's coarse clock (a touch's time) once tied, and the newer one went."""
    async with httpx.AsyncClient() as http:
        cache = ImageCache(tmp_path, http)
        await cache.open()
        keys = [f"sha256-{n:064x}" for n in range(50)]
        for key in keys:
            cache._used(key)
        times = [cache.used_at(key) for key in keys]
        assert times == sorted(times) and len(set(times)) == len(keys)
        assert cache.used_at("sha256-never") == 0
