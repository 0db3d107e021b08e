"""Authentication, the outbound URL policy and signed callbacks, through the real server."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging

import httpx
import pytest

from goldclone.client import APIError, AsyncClient
from goldclone.settings import Settings
from tests.harness import goldclone_server
from tests.servers import CallbackReceiver
from tests.test_callbacks import verify

pytestmark = pytest.mark.root

TOKEN = "s3cret-token-for-the-tests-0123456789"
IMAGE = {"url": "http://127.0.0.1:9/x.tar.gz", "checksum": "0" * 64}


async def test_tokens_guard_every_endpoint_but_healthz(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    guarded = dataclasses.replace(settings, api_tokens=(TOKEN, "another-token-0123456789"))
    async with (
        goldclone_server(guarded) as goldclone,
        httpx.AsyncClient(base_url=goldclone.client.base_url) as http,
    ):
        for method, path in [("GET", "/vms"), ("POST", "/vms"), ("GET", "/images"),
                             ("DELETE", "/vms/282ee68a-2e4d-4bd7-9c0e-7f37e12fc489"),
                             ("GET", "/openapi.json")]:  # fmt: skip
            response = await http.request(method, path, json={})
            assert response.status_code == 401, (method, path)
            assert response.json()["code"] == "unauthorized"
            assert response.headers["WWW-Authenticate"] == "Bearer"
        wrong = await http.get("/vms", headers={"Authorization": f"Bearer {TOKEN[:-1]}x"})
        assert wrong.status_code == 401
        big = await http.post("/vms", content=b" " * 10**6, headers={"Content-Type": "text/x"})
        assert big.status_code == 401, "refused before the body is read"
        assert (await http.get("/healthz")).json() == {"status": "ok"}

        ok = await http.get("/vms", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200
        async with AsyncClient(str(http.base_url), token="another-token-0123456789") as client:
            assert await client.list_vms() == []
        async with AsyncClient(str(http.base_url)) as client:
            with pytest.raises(APIError, match="unauthorized"):
                await client.list_vms()
    assert TOKEN not in caplog.text
    assert TOKEN not in repr(guarded)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"image": {**IMAGE, "url": "http://169.254.169.254/latest/x.tar.gz"}}, "image.url"),
        ({"image": {**IMAGE, "url": "http://[::ffff:169.254.169.254]/x"}}, "image.url"),
        ({"callback_url": "http://[fd00:ec2::254]/latest/meta-data"}, "callback_url"),
    ],
)
async def test_metadata_addresses_are_refused_at_once(
    settings: Settings, changes: dict[str, object], field: str
) -> None:
    async with goldclone_server(settings) as goldclone:
        response = await goldclone.client.post("/vms", json={"image": IMAGE, **changes})
        assert response.status_code == 400
        assert response.json()["message"].startswith(f"{field}: ")
        assert (await goldclone.client.get("/vms")).json() == {"vms": []}


async def test_private_addresses_can_be_denied(settings: Settings) -> None:
    strict = dataclasses.replace(settings, allow_private_urls=False)
    async with goldclone_server(strict) as goldclone:
        literal = await goldclone.client.post("/vms", json={"image": IMAGE})
        assert literal.status_code == 400 and "127.0.0.1" in literal.json()["message"]
        by_name = {"image": {**IMAGE, "url": "http://localhost:9/x.tar.gz"}}
        vm = await goldclone.post_vm(by_name)
        failed = await goldclone.wait_for(vm["id"], "error")
        assert failed["error"]["code"] == "url-forbidden"


async def test_callbacks_are_signed_when_a_secret_is_set(settings: Settings) -> None:
    key = b"the receiver's key"
    secret = "whsec_" + base64.b64encode(key).decode()
    signing = dataclasses.replace(settings, callback_secret=secret)
    with CallbackReceiver().running() as receiver:
        async with goldclone_server(signing) as goldclone:
            vm = await goldclone.post_vm({"image": IMAGE, "callback_url": receiver.url})
            [delivered] = await asyncio.to_thread(receiver.wait_for, 1, 30)
    assert delivered["id"] == vm["id"] and delivered["status"] == "error"
    assert verify(receiver.headers[0], receiver.raw_bodies[0], key)
