"""``disk_size`` through the API, on the synthetic driver: a clone's disk grown to it, never
below its image's; templates and pools of one disk size, claimed only by creates that ask for
it; a driver that cannot grow a disk refused up front; templates recorded before disk sizes
still used. In-process, no root."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from alembic import command
from sqlalchemy.ext.asyncio import create_async_engine

from goldclone.drivers.base import Capabilities
from goldclone.models import Template
from goldclone.service.admission import bounds_of, shape_refusal
from goldclone.settings import Limits
from goldclone.shape import GIB, Shape
from goldclone.store import schema, template_records
from goldclone.store.database import Database
from tests.fast.conftest import Service, image_of
from tests.fast.test_pools import pool_body
from tests.fast.test_templates import make_template, phases, ready_image
from tests.servers import FileServer


@pytest.fixture(scope="module")
def big_images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FileServer]:
    """Two qcow2 images of 3 GiB each (a few hundred KiB on the wire), made by qemu-img."""
    root = tmp_path_factory.mktemp("big")
    for name, cluster in (("big.qcow2", "65536"), ("big2.qcow2", "131072")):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                        f"cluster_size={cluster}", str(root / name), "3G"], check=True)  # fmt: skip
    with FileServer(root).running() as server:
        yield server


async def test_a_clone_is_grown_to_its_disk_size_and_never_below_its_images(
    service: Service, big_images: FileServer
) -> None:
    image = image_of(big_images, "big.qcow2")
    vm = await service.boot({"image": image, "cpus": 1, "memory": 256, "disk_size": 4})
    assert (vm["status"], vm["disk_size"]) == ("running", 4), vm
    assert service.host.machines[vm["id"]].disk_bytes == 4 * GIB
    same = await service.boot({"image": image, "cpus": 1, "memory": 256, "disk_size": 3})
    assert same["status"] == "running", same
    plain = await service.boot({"image": image, "cpus": 1, "memory": 256})
    assert (plain["disk_size"], service.host.machines[plain["id"]].disk_bytes) == (None, None)

    # the image is here: refused at once, and nothing recorded
    small = await service.client.post("/vms", json={"image": image, "disk_size": 2})
    assert small.status_code == 400, small.text
    assert small.json() == {
        "code": "invalid-request",
        "message": "disk_size: the image's disk is 3 GiB; a clone's disk can be grown, not "
        "shrunk to 2 GiB",
    }
    assert len((await service.client.get("/vms")).json()["vms"]) == 3

    # an image still to fetch: its VM fails once the image is here, and leaves nothing
    other = {"image": image_of(big_images, "big2.qcow2"), "disk_size": 2}
    failed = await service.boot(other)
    assert failed["status"] == "error" and failed["error"]["code"] == "disk-too-small", failed
    assert "not shrunk to 2 GiB" in failed["error"]["message"]
    assert failed["id"] not in service.host.machines and service.leftovers(failed["id"]) == []


async def test_templates_and_pools_are_of_one_disk_size(
    service: Service, request_body: dict[str, Any], big_images: FileServer
) -> None:
    image_id = await ready_image(service, request_body)
    template = await make_template(service, image_id, disk_size=2)
    assert (template["status"], template["disk_size"]) == ("ready", 2), template
    sized = await service.boot({**request_body, "disk_size": 2})
    assert (sized["started_from"], phases(sized)[2]) == ("template", "restoring"), sized
    assert service.host.machines[sized["id"]].disk_bytes == 2 * GIB
    for other in ({}, {"disk_size": 3}):  # another shape: booted cold
        vm = await service.boot({**request_body, **other})
        assert vm["started_from"] == "cold", (other, vm)

    await service.put_pool("sized", pool_body(request_body, size=1, disk_size=2))
    pool = await service.wait_pool("sized", 1)
    assert pool["disk_size"] == 2
    unsized = await service.boot({**request_body, "name": "unsized"})
    assert unsized["started_from"] != "pool"
    claimed = await service.boot({**request_body, "disk_size": 2, "name": "claimed"})
    assert (claimed["started_from"], claimed["pool"]) == ("pool", "sized"), claimed

    # below the image's size: a template and a pool of an image that is here are refused
    big_id = await ready_image(service, {"image": image_of(big_images, "big.qcow2")})
    sized = {"cpus": 1, "memory": 256, "disk_size": 2}
    response = await service.client.post(f"/images/{big_id}/templates", json=sized)
    assert response.status_code == 400 and "not shrunk" in response.json()["message"]
    big_pool = {"image": image_of(big_images, "big.qcow2"), "disk_size": 2, "size": 1}
    response = await service.client.put("/pools/small", json=big_pool)
    assert response.status_code == 400 and "not shrunk" in response.json()["message"]
    assert [p["name"] for p in (await service.client.get("/pools")).json()["pools"]] == ["sized"]


def test_a_host_whose_driver_cannot_grow_a_disk_never_takes_a_disk_size() -> None:
    vmware_like = Capabilities(network_types=("nat",), package_kinds=frozenset({"vmx"}))
    bounds = bounds_of(Limits(), vmware_like)
    assert shape_refusal(bounds, Shape(1, 256), None) is None
    refusal = shape_refusal(bounds, Shape(1, 256, 8), None)
    assert refusal == "disk_size: the driver cannot grow a clone's disk"
    older = {key: value for key, value in bounds.items() if key != "disk_size"}  # a host of
    assert shape_refusal(older, Shape(1, 256, 8), None) == refusal  # an earlier release


async def test_templates_recorded_before_disk_sizes_are_of_the_images_size(
    tmp_path: Path,
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"
    engine = create_async_engine(url)
    config = schema._config()

    def to_0012(connection: sqlalchemy.Connection) -> None:
        config.attributes["connection"] = connection
        command.upgrade(config, "0012")

    old = Template(id="t-1", image_id="sha256-" + "a" * 64, cpus=1, memory=256,
                   status="ready", created_at=0)  # fmt: skip
    try:
        async with engine.begin() as conn:
            await conn.run_sync(to_0012)
            await conn.execute(sqlalchemy.text(
                "INSERT INTO templates (id, image_key, cpus, memory, status, template, host_id) "
                "VALUES ('t-1', :image, 1, 256, 'ready', :template, 'test-host')"
            ), {"image": old.image_id, "template": old.model_dump_json()})  # fmt: skip
    finally:
        await engine.dispose()
    db = Database(url, "test-host")
    await db.open()
    try:
        shaped = await db.read(lambda c: template_records.ready_in_shape(c, Shape(1, 256)))
        assert shaped == {("test-host", old.image_id)}
        sized = await db.read(lambda c: template_records.ready_in_shape(c, Shape(1, 256, 4)))
        assert sized == set()
    finally:
        await db.close()
