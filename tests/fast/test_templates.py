"""Memory templates through the API, on the synthetic driver: making one, VMs of its image and
shape restored from it (and told their identity), cold boots when asked for or needed, and
templates that fail, are cut off by a restart, or go with their image. In-process, no root."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from goldclone.drivers.synthetic import SyntheticHost
from goldclone.guest.config import GuestConfig
from goldclone.settings import Settings
from tests.fast.conftest import Service, image_of, serving
from tests.servers import FileServer

SHAPE = {"cpus": 1, "memory": 256}


async def ready_image(service: Service, request_body: dict[str, Any]) -> str:
    vm = await service.boot(request_body)  # fetches the image
    await service.delete(vm["id"])
    return f"sha256-{request_body['image']['checksum']}"


async def template_of(service: Service, image_id: str, template_id: str) -> dict[str, Any]:
    images = (await service.client.get("/images")).json()["images"]
    [image] = [i for i in images if i["id"] == image_id]
    [template] = [t for t in image["templates"] if t["id"] == template_id]
    return template


async def wait_template(service: Service, image_id: str, template_id: str) -> dict[str, Any]:
    async with asyncio.timeout(10):
        while (found := await template_of(service, image_id, template_id))["status"] == "creating":
            await asyncio.sleep(0.01)
    return found


async def make_template(service: Service, image_id: str, **body: Any) -> dict[str, Any]:
    response = await service.client.post(f"/images/{image_id}/templates", json=SHAPE | body)
    assert response.status_code == 202, response.text
    return await wait_template(service, image_id, response.json()["id"])


def phases(vm: dict[str, Any]) -> list[str]:
    return [entry["phase"] for entry in vm["timeline"]]


async def test_vms_of_a_templates_image_and_shape_are_restored_from_it(
    service: Service, request_body: dict[str, Any]
) -> None:
    image_id = await ready_image(service, request_body)
    template = await make_template(service, image_id, ready_when={"guest_agent": True})
    assert template["status"] == "ready" and template["size_bytes"] > 0, template
    folder = service.settings.data_dir / "templates" / image_id / template["id"]
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == {
        "disk.qcow2": 0o400, "ram": 0o400, "state": 0o400,
    }  # fmt: skip
    assert template["id"] not in service.host.machines  # the machine that made it is gone

    body = {**request_body, "name": "restored", "user_data": "#!/bin/sh\necho hi\n",
            "metadata": {"job": "secret-1"}}  # fmt: skip
    vm = await service.boot(body)
    assert vm["status"] == "running" and vm["started_from"] == "template", vm
    assert phases(vm) == ["accepted", "cloning", "restoring", "running"]
    machine = service.host.machines[vm["id"]]
    assert machine.spec is not None and machine.spec.restore
    assert machine.personalized == GuestConfig(
        vm["id"], "restored", (), "#!/bin/sh\necho hi\n", {"job": "secret-1"}
    )
    again = await service.client.post(f"/images/{image_id}/templates", json=SHAPE)
    assert again.json()["id"] == template["id"]  # one template per image and shape


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"start": "cold"}, "asked for"),
        ({"cpus": 2}, "another shape"),
        ({"user_data": "#cloud-config\n{}\n"}, "cloud-config needs a first boot"),
    ],
)
async def test_a_cold_boot_when_asked_for_or_needed(
    service: Service, request_body: dict[str, Any], changes: dict[str, Any], why: str
) -> None:
    image_id = await ready_image(service, request_body)
    await make_template(service, image_id)
    vm = await service.boot({**request_body, **changes})
    assert (vm["started_from"], phases(vm)[2]) == ("cold", "booting"), why
    assert vm["start"] == changes.get("start", "auto")


async def test_a_guest_without_an_agent_gets_no_template(
    fast_settings: Settings, request_body: dict[str, Any]
) -> None:
    settings = dataclasses.replace(fast_settings, ready_timeout=1.0)
    async with serving(Service(settings, SyntheticHost(has_agent=False))) as service:
        image_id = await ready_image(service, request_body)
        failed = await make_template(service, image_id)
        assert failed["status"] == "error" and failed["error"]["code"] == "not-ready"
        assert "could not be given its own clock, hostname and keys" in failed["error"]["message"]
        assert not (service.settings.data_dir / "templates" / image_id / failed["id"]).exists()
        assert service.host.machines == {}
        vm = await service.boot(request_body)
        assert vm["started_from"] == "cold"


async def test_bad_template_requests(
    service: Service, request_body: dict[str, Any], images: FileServer
) -> None:
    unknown = await service.client.post("/images/sha256-00/templates", json=SHAPE)
    assert (unknown.status_code, unknown.json()["code"]) == (404, "image-not-found")
    other = image_of(images, "other.raw")
    stalled = {**other, "url": other["url"].replace("/other.raw", "/stall/other.raw")}
    pulled = (await service.client.post("/images", json=stalled)).json()
    early = await service.client.post(f"/images/{pulled['id']}/templates", json=SHAPE)
    assert (early.status_code, early.json()["code"]) == (409, "image-not-ready")
    assert "is downloading" in early.json()["message"]
    image_id = await ready_image(service, request_body)
    for body, message in (({"cpus": 1000}, "cpus: must be between"),
                          ({"colour": "red"}, "colour: unknown field")):  # fmt: skip
        response = await service.client.post(f"/images/{image_id}/templates", json=body)
        assert response.status_code == 400 and message in response.json()["message"]


async def test_templates_go_with_their_image(
    service: Service, request_body: dict[str, Any]
) -> None:
    image_id = await ready_image(service, request_body)
    template = await make_template(service, image_id)
    assert (await service.client.delete(f"/images/{image_id}")).status_code == 204
    assert not (service.settings.data_dir / "templates" / image_id).exists(), template
    assert (await service.client.get("/images")).json()["images"] == []


async def test_a_template_is_read_listed_and_deleted_once_nothing_needs_it(
    service: Service, request_body: dict[str, Any]
) -> None:
    client = service.client
    image_id = await ready_image(service, request_body)
    template = await make_template(service, image_id)
    image = (await client.get(f"/images/{image_id}")).json()
    assert image["id"] == image_id and [t["id"] for t in image["templates"]] == [template["id"]]
    listed = (await client.get(f"/images/{image_id}/templates")).json()
    assert listed == {"templates": image["templates"]}
    assert (await client.get("/images/sha256-00")).json()["code"] == "image-not-found"
    assert (await client.get("/images/sha256-00/templates")).status_code == 404
    path = f"/images/{image_id}/templates/{template['id']}"

    restored = await service.boot(request_body)
    assert restored["started_from"] == "template", restored
    refused = await client.delete(path)
    assert refused.status_code == 409 and refused.json()["code"] == "template-in-use"
    assert "1 VM(s) restored from it or being created" in refused.json()["message"]
    await service.delete(restored["id"])
    await service.put_pool("warm", {**request_body, "size": 1})
    refused = await client.delete(path)
    assert refused.status_code == 409 and "warm pool(s) warm" in refused.json()["message"]
    assert (await client.delete("/pools/warm")).status_code == 204

    assert (await client.delete(path)).status_code == 204
    assert not (service.settings.data_dir / "templates" / image_id / template["id"]).exists()
    assert (await client.get(f"/images/{image_id}/templates")).json() == {"templates": []}
    assert (await client.delete(path)).json()["code"] == "template-not-found"
    again = await service.boot(request_body)  # no template: a cold boot, and nothing breaks
    assert again["started_from"] == "cold", again


async def test_a_template_cut_off_by_a_restart_ends_interrupted(
    fast_settings: Settings, request_body: dict[str, Any]
) -> None:
    host = SyntheticHost()
    async with serving(Service(fast_settings, host)) as first:
        image_id = await ready_image(first, request_body)
        host.boot_seconds = 30
        response = await first.client.post(f"/images/{image_id}/templates", json=SHAPE)
        template_id = response.json()["id"]
        async with asyncio.timeout(5):
            while template_id not in host.machines:
                await asyncio.sleep(0.01)
    host.boot_seconds = 0
    async with serving(Service(fast_settings, host)) as restarted:
        ended = await template_of(restarted, image_id, template_id)
        assert ended["status"] == "error" and ended["error"]["code"] == "interrupted"
        assert template_id not in host.machines
        assert not (fast_settings.data_dir / "templates" / image_id / template_id).exists()


async def test_a_shape_booted_cold_often_gets_a_template(
    fast_settings: Settings, request_body: dict[str, Any]
) -> None:
    settings = dataclasses.replace(fast_settings, template_after=2)
    async with serving(Service(settings)) as service:
        image_id = f"sha256-{request_body['image']['checksum']}"
        first = await service.boot(request_body)
        await service.boot({**request_body, "start": "cold"})  # asked for: does not count
        await service.boot({**request_body, "cpus": 2})  # another shape
        assert [i["templates"] for i in (await service.client.get("/images")).json()["images"]] == [
            []
        ]
        second = await service.boot(request_body)
        assert first["started_from"] == second["started_from"] == "cold"
        [image] = (await service.client.get("/images")).json()["images"]
        [template] = image["templates"]
        assert (template["cpus"], template["memory"]) == (1, 256)
        await wait_template(service, image_id, template["id"])
        third = await service.boot(request_body)
        assert third["started_from"] == "template"
