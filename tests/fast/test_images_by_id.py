"""A gold image named by its ID (``{"image": {"id": "sha256-..."}}``), as one made from a VM
and never pushed is: it starts VMs and pools on the host that holds it, at once; a tenant that
may not use it is told there is none; in a fleet its VMs go to the host that holds it. On the
synthetic driver, in-process, no root."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

from goldclone.settings import Limits
from tests.fast.conftest import Service, as_, serving, settings_on, tokens
from tests.postgres import PostgresCluster


class Tenant:
    """``service``'s API as one token's holder sees it."""

    def __init__(self, service: Service, name: str) -> None:
        self.service, self.headers = service, as_(name)

    async def post(self, url: str, body: dict[str, Any]) -> Any:
        return await self.service.client.post(url, json=body, headers=self.headers)

    async def boot(self, body: dict[str, Any]) -> dict[str, Any]:
        posted = await self.post("/vms", body)
        assert posted.status_code == 202, posted.text
        url = f"/vms/{posted.json()['id']}"
        while (vm := (await self.service.client.get(url, headers=self.headers)).json())[
            "status"
        ] == "creating":
            await asyncio.sleep(self.service.poll)
        return dict(vm)

    async def make_image(self, body: dict[str, Any]) -> str:
        vm = await self.boot(body)
        made = await self.post(f"/vms/{vm['id']}/image", {"name": "ci base"})
        assert made.status_code == 201, made.text
        return str(made.json()["id"])


async def test_an_image_made_from_a_vm_starts_vms_and_pools_by_its_id(
    tmp_path: Path, database_url: str, request_body: dict[str, Any]
) -> None:
    settings = replace(settings_on(tmp_path, database_url), tokens=tokens())
    async with serving(Service(settings)) as service:
        alice, bob = Tenant(service, "alice"), Tenant(service, "bob")
        image_id = await alice.make_image(request_body)
        by_id = {"image": {"id": image_id}, "cpus": 1, "memory": 256}
        vm = await alice.boot(by_id)
        assert (vm["status"], vm["image"], vm["image_from_cache"]) == (
            "running", {"id": image_id}, True,
        ), vm  # fmt: skip
        assert service.host.machines[vm["id"]].gold == image_id

        refused = await bob.post("/vms", by_id)  # not bob's: as if it were not there
        assert (refused.status_code, refused.json()["code"]) == (404, "image-not-found")
        unknown = await alice.post("/vms", {"image": {"id": "sha256-" + "0" * 64}})
        assert (unknown.status_code, unknown.json()["code"]) == (404, "image-not-found")
        for bad in ({"id": image_id, "oci": "127.0.0.1:5000/a/b:c"}, {"id": "latest"}):
            response = await alice.post("/vms", {"image": bad})
            assert response.status_code == 400, (bad, response.text)
        prefetch = await Tenant(service, "ops").post("/images", {"id": image_id})
        assert prefetch.status_code == 400 and "here already" in prefetch.json()["message"]

        pool = {**by_id, "size": 1}
        put = await service.client.put("/pools/built", json=pool, headers=as_("ops"))
        assert put.status_code == 201, put.text
        service.client.headers.update(as_("ops"))  # for the waits of ApiCalls
        await service.wait_pool("built", 1)
        claimed = await alice.boot(by_id)
        assert (claimed["status"], claimed["started_from"]) == ("running", "pool"), claimed


async def test_in_a_fleet_a_vm_of_an_image_named_by_its_id_goes_to_the_host_that_holds_it(
    tmp_path: Path, postgres: PostgresCluster, request_body: dict[str, Any]
) -> None:
    fleet = await postgres.new_database()  # hosts of a fleet hear each other on PostgreSQL

    def host(name: str) -> Service:
        settings = replace(settings_on(tmp_path / name, fleet), host_id=name,
                           tokens=tokens(), limits=Limits(max_vms=4))  # fmt: skip
        return Service(settings)

    async with serving(host("maker")) as maker, serving(host("other")) as other:
        image_id = await Tenant(maker, "alice").make_image(request_body)
        for _ in range(3):  # spread would put some on the other host, which has no such image
            vm = await Tenant(other, "alice").boot({"image": {"id": image_id}, "memory": 256})
            assert (vm["status"], vm["host"]) == ("running", "maker"), vm
