"""Who may touch what on the API: each route with a token of each role, and tenants that see
and change only their own VMs. In-process, on the synthetic driver; no root."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
from typing import Any

import pytest
import uvicorn
import websockets
from fastapi import WebSocket
from websockets.exceptions import InvalidStatus

from goldclone import settings_sources
from goldclone.access import Access, Role, digest_of
from goldclone.conversions import named_tokens
from goldclone.image_spec import ImageSpec
from goldclone.models import VM, Status
from goldclone.polling import until
from goldclone.server import build_app
from goldclone.service.events import VMFilter
from goldclone.settings import Settings
from goldclone.settings_sources import SettingsError
from goldclone.store.event_log import Event, EventKind
from tests.fast.conftest import (
    DISK,
    LEGACY_API,
    LEGACY_METRICS,
    Service,
    as_,
    image_of,
    serving,
    tokens,
)
from tests.servers import FileServer


@pytest.fixture
def access_settings(fast_settings: Settings) -> Settings:
    return dataclasses.replace(fast_settings, tokens=tokens(), api_tokens=(LEGACY_API,),
                               metrics_tokens=(LEGACY_METRICS,))  # fmt: skip


NOBODY = "00000000-0000-4000-8000-000000000000"
ROUTES: list[tuple[str, str, Role | None]] = [
    ("GET", "/healthz", None),
    ("GET", "/readyz", Role.READ),
    ("GET", "/openapi.json", Role.READ),
    ("GET", "/vms", Role.READ),
    ("GET", f"/vms/{NOBODY}", Role.READ),
    ("GET", f"/vms/{NOBODY}/console", Role.READ),
    ("GET", "/images", Role.READ),
    ("GET", "/pools", Role.READ),
    ("GET", "/pools/nope", Role.READ),
    ("GET", "/hosts", Role.READ),
    ("GET", "/metrics", Role.METRICS),
    ("POST", "/vms", Role.USER),
    ("PATCH", f"/vms/{NOBODY}", Role.USER),
    ("DELETE", f"/vms/{NOBODY}", Role.USER),
    ("POST", "/images", Role.OPERATOR),
    ("POST", "/images/nope/templates", Role.OPERATOR),
    ("DELETE", "/images/nope", Role.OPERATOR),
    ("GET", "/images/nope", Role.READ),
    ("GET", "/images/nope/templates", Role.READ),
    ("DELETE", "/images/nope/templates/nope", Role.OPERATOR),
    ("PATCH", "/images/nope", Role.OPERATOR),
    ("PUT", "/pools/nope", Role.OPERATOR),
    ("DELETE", "/pools/nope", Role.OPERATOR),
    ("DELETE", "/hosts/nope", Role.OPERATOR),
]
"""Each route, and the least role that may use it (``None``: no token needed). Bodies are
left empty: a role that may use the route gets past the guard to the body's 400."""
ROLES = {
    "alice": Role.USER, "alice-reader": Role.READ, "ops": Role.OPERATOR, "root": Role.ADMIN,
    "scraper": Role.METRICS, "legacy-api": Role.ADMIN, "legacy-metrics": Role.METRICS,
}  # fmt: skip
_ORDER = [Role.READ, Role.USER, Role.OPERATOR, Role.ADMIN]


def _may(role: Role, needed: Role | None) -> bool:
    if needed is None:
        return True
    if needed is Role.METRICS:
        return role in (Role.METRICS, Role.OPERATOR, Role.ADMIN)
    return role is not Role.METRICS and _ORDER.index(role) >= _ORDER.index(needed)


async def test_each_route_takes_the_roles_that_may_use_it_and_refuses_the_others(
    access_settings: Settings,
) -> None:
    async with serving(Service(access_settings)) as service:
        for method, path, needed in ROUTES:
            body = {} if method in ("POST", "PUT", "PATCH") else None
            anonymous = await service.client.request(method, path, json=body)
            assert anonymous.status_code == (200 if needed is None else 401), (method, path)
            wrong = await service.client.request(
                method, path, json=body, headers={"Authorization": "Bearer not-a-token-at-all"}
            )
            assert wrong.status_code == (200 if needed is None else 401), (method, path)
            for name, role in ROLES.items():
                response = await service.client.request(method, path, json=body, headers=as_(name))
                refused = response.status_code == 403
                assert refused != _may(role, needed), (name, method, path, response.text)
                if refused:
                    assert response.json()["code"] == "forbidden"
                    assert as_(name)["Authorization"].removeprefix("Bearer ") not in response.text


async def test_a_tenant_sees_and_changes_only_its_own_vms(
    access_settings: Settings, request_body: dict[str, Any]
) -> None:
    async with serving(Service(access_settings)) as service:
        client = service.client
        body = {**request_body, "name": "ci-1"}
        mine = await _boot(service, body, "alice")
        theirs = await _boot(service, body, "bob")  # one name in each tenant
        assert (mine["tenant"], theirs["tenant"]) == ("team-a", "team-b")
        again = await client.post("/vms", json=body, headers=as_("alice"))
        assert again.status_code == 409 and again.json()["code"] == "name-conflict"

        vm = f"/vms/{mine['id']}"
        for method, path, json in (
            ("GET", vm, None), ("GET", f"{vm}?wait=true&timeout=1", None),
            ("GET", f"{vm}/console", None), ("PATCH", vm, {"labels": {"x": "y"}}),
            ("DELETE", vm, None),
        ):  # fmt: skip
            response = await client.request(method, path, json=json, headers=as_("bob"))
            assert response.status_code == 404, (method, path)
            assert response.json()["code"] == "vm-not-found"
        assert (await client.get(vm, headers=as_("alice-reader"))).status_code == 200
        assert (await client.delete(vm, headers=as_("alice-reader"))).status_code == 403

        def listed(name: str) -> Any:
            return client.get("/vms", headers=as_(name))

        assert [v["id"] for v in (await listed("alice")).json()["vms"]] == [mine["id"]]
        assert [v["id"] for v in (await listed("bob")).json()["vms"]] == [theirs["id"]]
        assert len((await listed("root")).json()["vms"]) == 2  # admin: every tenant's
        assert (await listed("ops")).json()["vms"] == []  # an operator is a tenant too

        assert (await client.delete(vm, headers=as_("alice"))).status_code == 204
        other = f"/vms/{theirs['id']}"
        assert (await client.delete(other, headers=as_("root"))).status_code == 204


async def test_a_vm_is_named_by_its_id_its_name_or_the_start_of_its_id_in_its_tenant(
    access_settings: Settings, request_body: dict[str, Any]
) -> None:
    async with serving(Service(access_settings)) as service:
        client = service.client
        mine = await _boot(service, {**request_body, "name": "web-1"}, "alice")
        other = await _boot(service, {**request_body, "name": "web-2"}, "alice")
        theirs = await _boot(service, {**request_body, "name": "web-1"}, "bob")

        async def found(ref: str, who: str) -> Any:
            response = await client.get(f"/vms/{ref}", headers=as_(who))
            return response.json()["id"] if response.status_code == 200 else response.json()

        assert await found("web-1", "alice") == mine["id"]
        assert await found("web-1", "bob") == theirs["id"]
        assert await found(mine["id"].upper(), "alice") == mine["id"]  # any spelling of an ID
        assert await found(mine["id"][:8], "alice") == mine["id"]
        assert (await found(theirs["id"][:8], "alice"))["code"] == "vm-not-found"
        assert (await found("web-3", "alice"))["code"] == "vm-not-found"
        twice = await found("web-1", "root")  # an admin sees both tenants' web-1
        assert twice["code"] == "vm-ambiguous" and "(web-1)" in twice["message"], twice

        patched = await client.patch(
            "/vms/web-2", json={"labels": {"a": "b"}}, headers=as_("alice")
        )
        assert patched.json()["id"] == other["id"] and patched.json()["labels"] == {"a": "b"}
        assert (await client.get("/vms/web-1/console", headers=as_("alice"))).status_code == 200
        assert (await client.delete("/vms/web-1", headers=as_("alice"))).status_code == 204
        assert await found("web-1", "bob") == theirs["id"]  # bob's is still there
        for vm in (other, theirs):
            assert (await client.delete(f"/vms/{vm['id']}", headers=as_("root"))).status_code == 204


async def test_idempotency_keys_are_each_tenants_own(
    access_settings: Settings, request_body: dict[str, Any]
) -> None:
    async with serving(Service(access_settings)) as service:
        made = {}
        for name in ("alice", "bob", "alice"):
            headers = {**as_(name), "Idempotency-Key": "job-42"}
            response = await service.client.post("/vms", json=request_body, headers=headers)
            assert response.status_code == 202, response.text
            made.setdefault(name, set()).add(response.json()["id"])
        assert len(made["alice"]) == 1 and made["alice"] != made["bob"]


async def test_two_tenants_that_choose_one_network_group_are_two_groups(
    access_settings: Settings, request_body: dict[str, Any]
) -> None:
    async with serving(Service(access_settings)) as service:
        body = {**request_body, "network_group": "build"}
        vms = [await _boot(service, body, name) for name in ("alice", "bob", "alice")]
        groups = [service.host.machines[vm["id"]].reaches[-1].group for vm in vms]
        assert groups == ["team-a/build", "team-b/build", "team-a/build"]
        assert [vm["network_group"] for vm in vms] == ["build"] * 3  # as asked


def test_a_tenants_event_stream_carries_its_vms_and_the_images_and_pools() -> None:
    image = ImageSpec(url="http://127.0.0.1/x", checksum="0" * 64)  # type: ignore[arg-type]
    vm = VM(id=NOBODY, image=image, cpus=1, memory=256, network_type="nat", headless=True,
            callback_url=None, created_at="2026-12-07T00:00:00Z", timeline=[], tenant="team-a",
            status=Status.RUNNING)  # fmt: skip

    def event(kind: EventKind, data: dict[str, Any]) -> Event:
        return Event(id=1, kind=kind, subject="s", at="2026-12-07T00:00:00Z", data=data)

    own, image_event = event(EventKind.VM, vm.model_dump(mode="json")), event(EventKind.IMAGE, {})
    assert VMFilter(tenant="team-a").passes(own)
    assert not VMFilter(tenant="team-b").passes(own)
    assert not VMFilter(tenant="team-b").passes(event(EventKind.VM_DELETED, own.data))
    assert VMFilter(tenant="team-b").passes(image_event)


def test_tokens_are_read_from_the_config_file_by_the_hash_of_their_secret(tmp_path: Any) -> None:
    secret = "a-token-secret-of-some-length"
    config = tmp_path / "goldclone.toml"
    config.write_text(f'[tokens.ci-a]\nsha256 = "{digest_of(secret)}"\nrole = "user"\n')
    settings = settings_sources.load(config, env={})
    [token] = settings.tokens
    assert (token.name, token.role, token.tenant) == ("ci-a", Role.USER, "ci-a")
    principal = Access(settings.tokens).principal(secret.encode())
    assert principal is not None and principal.tenant == "ci-a"
    assert Access(settings.tokens).principal(digest_of(secret).encode()) is None  # not the hash


@pytest.mark.parametrize(
    ("table", "reason"),
    [
        ({"Bad_Name": {"sha256": "0" * 64, "role": "user"}}, "name must be"),
        ({"ci": {"sha256": "xyz", "role": "user"}}, "sha256 must be"),
        ({"ci": {"sha256": "0" * 64, "role": "root"}}, "role must be one of"),
        ({"ci": {"sha256": "0" * 64, "role": "user", "tenant": "A B"}}, "tenant must be"),
        ({"ci": {"sha256": "0" * 64, "role": "user", "secret": "x"}}, "a table of"),
        ({"a": {"sha256": "0" * 64, "role": "user"}, "b": {"sha256": "0" * 64, "role": "read"}},
         "one secret"),
    ],
)  # fmt: skip
def test_a_bad_token_table_is_refused_with_its_reason(table: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        named_tokens(table)
    with pytest.raises(SettingsError, match="GOLDCLONE_TOKENS"):
        settings_sources.from_env({"GOLDCLONE_TOKENS": json.dumps(table)})


async def _boot(service: Service, body: dict[str, Any], name: str) -> dict[str, Any]:
    vm = await _create(service, body, name)
    assert vm["status"] == "running", vm
    return vm


async def test_a_tenant_gets_anothers_cached_image_only_by_showing_it_has_it(
    access_settings: Settings, images: FileServer
) -> None:
    """The cache keeps one gold image per package, but a tenant that names another's image by
    its checksum gets it only through a URL that gives the package (checked by a download
    unless it was shown before), or once an operator made it public."""
    disk = image_of(images)
    shape = {"cpus": 1, "memory": 256}
    elsewhere = {**disk, "url": images.url(f"slow/{DISK}")}  # the same package, another URL
    forged = {**disk, "url": images.url("other.raw")}  # another package under its checksum
    async with serving(Service(access_settings)) as service:
        client = service.client

        async def listed(name: str) -> list[str]:
            found = (await client.get("/images", headers=as_(name))).json()["images"]
            return [image["id"] for image in found]

        async def held(name: str) -> list[str]:
            [host] = (await client.get("/hosts", headers=as_(name))).json()["hosts"]
            return list(host["images"])

        await _boot(service, {"image": disk, **shape}, "alice")
        [gold] = await listed("alice")
        assert await listed("bob") == [] and await listed("root") == [gold]
        assert await held("alice") == await held("root") == [gold] and await held("bob") == []
        for name, status in (("alice", 200), ("bob", 404)):  # one image, as the list shows it
            assert (await client.get(f"/images/{gold}", headers=as_(name))).status_code == status

        failed = await _create(service, {"image": forged, **shape}, "bob")
        assert (failed["status"], failed["error"]["code"]) == ("error", "checksum-mismatch")
        assert await listed("bob") == []

        before = images.gets[disk["url"].split("/", 3)[3]]
        await _boot(service, {"image": disk, **shape}, "bob")  # alice's URL: no download
        assert images.gets[disk["url"].split("/", 3)[3]] == before
        assert await listed("bob") == [gold] and await held("bob") == [gold]

        checked = images.gets[f"slow/{DISK}"]
        await _boot(service, {"image": elsewhere, **shape}, "ops")
        assert images.gets[f"slow/{DISK}"] == checked + 1  # downloaded once to check it
        await _boot(service, {"image": elsewhere, **shape}, "ops")
        assert images.gets[f"slow/{DISK}"] == checked + 1  # shown already

        assert (await _create(service, {"image": forged, **shape}, "root"))["status"] == "error"
        made_public = await client.patch(f"/images/{gold}", json={"public": True},
                                         headers=as_("ops"))  # fmt: skip
        assert made_public.status_code == 200 and made_public.json()["public"] is True
        refused = await client.patch(f"/images/{gold}", json={"public": True},
                                     headers=as_("alice"))  # fmt: skip
        assert refused.status_code == 403
        public = await _create(service, {"image": forged, **shape}, "root")
        assert public["status"] == "running", public  # public: its checksum is enough


async def test_a_pooled_machine_goes_only_to_a_url_shown_to_give_its_image(
    access_settings: Settings, images: FileServer
) -> None:
    disk = image_of(images)
    forged = {**disk, "url": images.url("other.raw")}
    pool = {"image": disk, "cpus": 1, "memory": 256, "size": 1}
    async with serving(Service(access_settings)) as service:
        response = await service.client.put("/pools/warm", json=pool, headers=as_("ops"))
        assert response.status_code == 201, response.text
        await until(lambda: _ready(service, "warm"), timeout=30, interval=0.01)
        failed = await _create(service, {**pool, "image": forged, "size": None}, "bob")
        assert failed["started_from"] != "pool" and failed["status"] == "error", failed
        claimed = await _boot(service, {"image": disk, "cpus": 1, "memory": 256}, "bob")
        assert claimed["started_from"] == "pool"


async def _ready(service: Service, pool: str) -> bool:
    response = await service.client.get(f"/pools/{pool}", headers=as_("ops"))
    return bool(response.json()["ready"] >= 1)


async def _create(service: Service, body: dict[str, Any], name: str) -> dict[str, Any]:
    """The VM that ``body`` makes for ``name``'s token, once it is no longer ``creating``."""
    body = {key: value for key, value in body.items() if value is not None}
    response = await service.client.post("/vms", json=body, headers=as_(name))
    assert response.status_code == 202, response.text
    vm_id = response.json()["id"]
    while (vm := (await service.client.get(f"/vms/{vm_id}?wait=true", headers=as_(name))).json())[
        "status"
    ] == "creating":
        pass
    return dict(vm)


async def test_a_websocket_is_refused_without_a_token_as_a_request_is(
    access_settings: Settings,
) -> None:
    """No route of the API is a WebSocket yet; this one, added for the test, shows that the
    guard stops one as it stops any request (it let every non-HTTP scope through)."""
    service = Service(access_settings)
    app = build_app(access_settings, driver=service.driver)

    async def probe(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(websocket.scope["state"]["principal"].name)
        await websocket.close()

    app.add_api_websocket_route("/probe", probe)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    url = f"ws://127.0.0.1:{sock.getsockname()[1]}/probe"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", ws="websockets-sansio"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await until(lambda: server.started or None, interval=0.01, timeout=10)
        for headers, status in (
            ({}, 401),
            (as_("scraper"), 403),
            ({"Authorization": "Bearer wrong-0123456789"}, 401),
        ):
            with pytest.raises(InvalidStatus) as refused:
                await websockets.connect(url, additional_headers=headers)
            assert refused.value.response.status_code == status, headers
            code = json.loads(refused.value.response.body or b"{}").get("code")
            assert code == {401: "unauthorized", 403: "forbidden"}[status]
        async with websockets.connect(url, additional_headers=as_("alice")) as accepted:
            assert await accepted.recv() == "alice"
    finally:
        server.should_exit = True
        await serving
        sock.close()
