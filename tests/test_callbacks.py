"""Callback delivery against a real receiver on loopback: signing, retries, Retry-After."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import uuid

import httpx

from goldclone.models import VM, ImageSpec, now_s
from goldclone.outbound.callbacks import deliver, signing_key
from goldclone.outbound.policy import OutboundPolicy, PolicyTransport
from tests.servers import CallbackReceiver

SECRET = "whsec_" + base64.b64encode(b"a shared secret of the receiver").decode()


def vm_for(url: str) -> VM:
    return VM(
        id=str(uuid.uuid4()), image=ImageSpec(url="http://127.0.0.1/x", checksum="0" * 64),
        cpus=1, memory=256, network_type="nat", headless=True, callback_url=url,
        created_at=now_s(),
    )  # fmt: skip


def verify(headers: dict[str, str], body: bytes, key: bytes) -> bool:
    """A receiver's check, written from the Standard Webhooks description."""
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(
        hmac.compare_digest(f"v1,{expected}", candidate)
        for candidate in headers["webhook-signature"].split()
    )


async def test_signed_deliveries_keep_their_id_across_retries() -> None:
    with CallbackReceiver(fail_first=2).running() as receiver:
        vm = vm_for(receiver.url)
        async with httpx.AsyncClient() as http:
            assert await deliver(http, vm, attempts=3, backoff=0.01, secret=SECRET)
    assert receiver.attempts == 3
    ids = {headers["webhook-id"] for headers in receiver.headers}
    assert len(ids) == 1 and ids.pop().startswith("msg_")
    for headers in receiver.headers:
        assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    [body] = receiver.raw_bodies
    assert verify(receiver.headers[-1], body, base64.b64decode(SECRET.removeprefix("whsec_")))
    assert not verify(receiver.headers[-1], body, b"another key")
    assert receiver.bodies == [vm.model_dump(mode="json")]


async def test_unsigned_without_a_secret() -> None:
    with CallbackReceiver().running() as receiver:
        async with httpx.AsyncClient() as http:
            assert await deliver(http, vm_for(receiver.url))
    assert not any(name.startswith("webhook-") for name in receiver.headers[0])


def test_a_plain_secret_is_its_own_key() -> None:
    assert signing_key("not base64 at all!") == b"not base64 at all!"
    assert signing_key(SECRET) == b"a shared secret of the receiver"


async def test_retry_after_is_honoured() -> None:
    with CallbackReceiver(fail_first=1, retry_after="1").running() as receiver:
        async with httpx.AsyncClient() as http:
            assert await deliver(http, vm_for(receiver.url), attempts=2, backoff=0.01)
    assert receiver.attempts == 2
    assert receiver.times[1] - receiver.times[0] >= 0.95


async def test_a_receiver_that_never_answers_well_gets_each_attempt_then_is_let_go() -> None:
    with CallbackReceiver(fail_first=10**6).running() as receiver:
        async with httpx.AsyncClient() as http:
            assert not await deliver(http, vm_for(receiver.url), attempts=3, backoff=0.01)
    assert receiver.attempts == 3


async def test_a_forbidden_callback_address_is_not_contacted_or_retried() -> None:
    transport = PolicyTransport(OutboundPolicy(allow_private=True))
    async with httpx.AsyncClient(transport=transport) as http:
        started = time.monotonic()
        delivered = await deliver(http, vm_for("http://169.254.169.254/latest"), backoff=5)
    assert not delivered
    assert time.monotonic() - started < 1, "no retries, no connection attempts"
