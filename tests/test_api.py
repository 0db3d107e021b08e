"""The HTTP contract of API.md: status codes, error bodies and validation, without booting,
through a real HTTP server on loopback. The API does not depend on the driver: it runs on the
synthetic one, and needs no root."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from goldclone.settings import Settings
from tests.harness import Goldclone

SHA1 = "5cf00d380e28d02f30efaceafef7c7c8bdedae33"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, driver="synthetic")


def body(**changes: Any) -> dict[str, Any]:
    request: dict[str, Any] = {
        "cpus": 1,
        "memory": 256,
        "network_type": "nat",
        "image": {"url": "http://127.0.0.1:9/x.tar.gz", "checksum": SHA1, "checksum_type": "sha1"},
    }
    request.update(changes)
    return request


def assert_error(response: Any, status: int, code: str, mentions: str = "") -> None:
    assert response.status_code == status, response.text
    error = response.json()
    assert set(error) == {"code", "message"}
    assert error["code"] == code
    assert mentions in error["message"]
    assert "Traceback" not in response.text


async def test_unknown_vm_is_404(goldclone: Goldclone) -> None:
    for path in ("/vms/282ee68a-2e4d-4bd7-9c0e-7f37e12fc489", "/vms/not-a-uuid"):
        assert_error(await goldclone.client.get(path), 404, "vm-not-found")
        assert_error(await goldclone.client.delete(path), 404, "vm-not-found")


async def test_empty_list(goldclone: Goldclone) -> None:
    response = await goldclone.client.get("/vms")
    assert response.status_code == 200
    assert response.json() == {"vms": []}


async def test_non_json_body_is_415(goldclone: Goldclone) -> None:
    response = await goldclone.client.post(
        "/vms", content=b"cpus=2", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert_error(response, 415, "unsupported-media-type")
    response = await goldclone.client.post("/vms", content=b"{}")
    assert_error(response, 415, "unsupported-media-type")


async def test_json_with_charset_is_accepted(goldclone: Goldclone) -> None:
    response = await goldclone.client.post(
        "/vms", content=b"{}", headers={"Content-Type": "application/json; charset=utf-8"}
    )
    assert_error(response, 400, "invalid-request", "image: is required")


async def test_invalid_json_is_400(goldclone: Goldclone) -> None:
    response = await goldclone.client.post(
        "/vms", content=b'{"cpus": 2,', headers={"Content-Type": "application/json"}
    )
    assert_error(response, 400, "invalid-json")


async def test_body_over_limit_is_413(goldclone: Goldclone) -> None:
    big = body(callback_url="http://x/" + "a" * (goldclone.settings.max_body_bytes + 1))
    assert_error(await goldclone.client.post("/vms", json=big), 413, "body-too-large")

    async def chunked() -> Any:
        for _ in range(goldclone.settings.max_body_bytes // 1024 + 1):
            yield b" " * 1024

    response = await goldclone.client.post(
        "/vms", content=chunked(), headers={"Content-Type": "application/json"}
    )
    assert_error(response, 413, "body-too-large")


@pytest.mark.parametrize(
    ("request_body", "mentions"),
    [
        (body(cpus=0), "cpus"),
        (body(cpus=4096), "cpus"),
        (body(cpus="2"), "cpus"),
        (body(cpus=True), "cpus"),
        (body(memory=1), "memory"),
        (body(memory=10**9), "memory"),
        (body(network_type="vlan"), "network_type"),
        (body(headless="yes"), "headless"),
        (body(colour="blue"), "colour: unknown field"),
        (body(image=None), "image"),
        (body(image={"url": "ftp://x/y", "checksum": SHA1, "checksum_type": "sha1"}), "url"),
        (
            body(image={"url": "http://x/y", "checksum": SHA1, "checksum_type": "crc32"}),
            "checksum_type",
        ),
        (
            body(image={"url": "http://x/y", "checksum": SHA1[:-1], "checksum_type": "sha1"}),
            "40 hex",
        ),
        (
            body(image={"url": "http://x/y", "checksum": "z" * 40, "checksum_type": "sha1"}),
            "hexadecimal",
        ),
        (
            body(image={"url": "http://x/y", "checksum": SHA1, "typo": 1}),
            "image.typo: unknown field",
        ),
        (body(callback_url="gopher://x"), "callback_url"),
    ],
)
async def test_bad_requests_are_400_and_name_the_field(
    goldclone: Goldclone, request_body: dict[str, Any], mentions: str
) -> None:
    response = await goldclone.client.post("/vms", json=request_body)
    assert_error(response, 400, "invalid-request", mentions)
    assert (await goldclone.client.get("/vms")).json() == {"vms": []}


async def test_checksum_in_either_case_is_accepted(goldclone: Goldclone) -> None:
    vm = await goldclone.post_vm(
        body(
            image={"url": "http://127.0.0.1:9/x", "checksum": SHA1.upper(), "checksum_type": "sha1"}
        )
    )
    assert vm["status"] == "creating"
    assert vm["image"]["checksum"] == SHA1.upper()
    failed = await goldclone.wait_for(vm["id"], "error")
    assert failed["error"]["code"] == "download-failed"


async def test_defaults_fill_in(goldclone: Goldclone) -> None:
    minimal = {"image": {"url": "http://127.0.0.1:9/x", "checksum": "0" * 64}}
    vm = await goldclone.post_vm(minimal)
    assert (vm["cpus"], vm["memory"], vm["network_type"], vm["headless"]) == (2, 1024, "nat", True)
    assert vm["image"]["checksum_type"] == "sha256"
    assert vm["callback_url"] is None and vm["ip_address"] == "" and vm["error"] is None
    assert [entry["phase"] for entry in vm["timeline"]] == ["accepted"]


async def test_openapi_describes_the_api(goldclone: Goldclone) -> None:
    spec = (await goldclone.client.get("/openapi.json")).json()
    assert set(spec["paths"]) >= {"/vms", "/vms/{vm_id}"}
    assert {"get", "post"} <= set(spec["paths"]["/vms"])
    assert {"get", "delete"} <= set(spec["paths"]["/vms/{vm_id}"])
    assert "CreateVMRequest" in spec["components"]["schemas"]


async def test_unknown_path_and_method_are_json(goldclone: Goldclone) -> None:
    response = await goldclone.client.get("/nowhere")
    assert response.status_code == 404 and set(response.json()) == {"code", "message"}
    response = await goldclone.client.put("/vms", json={})
    assert response.status_code == 405 and set(response.json()) == {"code", "message"}


async def test_a_network_type_the_host_does_not_offer_is_400_saying_why(
    goldclone: Goldclone,
) -> None:
    """The driver's reason, whatever it is (QEMU's bridged needs the operator's host bridge:
    tests/test_network.py), reaches the client."""
    response = await goldclone.client.post("/vms", json=body(network_type="bridged"))
    assert_error(response, 400, "invalid-request", "'bridged' is not offered by this synthetic")
