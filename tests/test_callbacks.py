"""Callback delivery against a real receiver on loopback, with its pending deliveries in a real
SQLite store: signing, the retry schedule, Retry-After, 410, and a receiver that is down while
the service restarts."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from goldclone import __version__
from goldclone.clock import after, now_s
from goldclone.image_spec import ImageSpec
from goldclone.models import VM
from goldclone.outbound.callbacks import Outcome, attempt, new_message_id, signing_key
from goldclone.outbound.policy import OutboundPolicy, PolicyTransport
from goldclone.service.deliveries import Deliveries
from goldclone.store import delivery_records
from goldclone.store.database import Database
from tests.servers import CallbackReceiver, free_port

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


@asynccontextmanager
async def delivering(
    db: Database, schedule: tuple[float, ...], secret: str | None = None
) -> AsyncIterator[tuple[Deliveries, list[str]]]:
    """Deliveries on ``db`` with ``schedule``, and the outcomes of those that end."""
    ended: list[str] = []
    async with httpx.AsyncClient() as http:
        deliveries = Deliveries(db, http, schedule, secret, ended.append)
        deliveries.start()
        try:
            yield deliveries, ended
        finally:
            await deliveries.close()


async def until_ended(ended: list[str], count: int = 1, timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while len(ended) < count:
            await asyncio.sleep(0.02)


async def test_a_signed_attempt_names_goldclone_and_verifies() -> None:
    with CallbackReceiver().running() as receiver:
        body, message_id = b'{"id": "x"}', new_message_id()
        async with httpx.AsyncClient() as http:
            tried = await attempt(http, receiver.url, body, message_id, SECRET)
    assert tried.outcome is Outcome.DELIVERED
    [headers] = receiver.headers
    assert headers["user-agent"] == f"goldclone/{__version__}" and __version__ != "0.0.0"
    assert headers["webhook-id"] == message_id and message_id.startswith("msg_")
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    assert verify(headers, body, base64.b64decode(SECRET.removeprefix("whsec_")))
    assert not verify(headers, body, b"another key")


async def test_unsigned_without_a_secret() -> None:
    with CallbackReceiver().running() as receiver:
        async with httpx.AsyncClient() as http:
            await attempt(http, receiver.url, b"{}", new_message_id())
    assert not any(name.startswith("webhook-") for name in receiver.headers[0])


def test_a_plain_secret_is_its_own_key() -> None:
    assert signing_key("not base64 at all!") == b"not base64 at all!"
    assert signing_key(SECRET) == b"a shared secret of the receiver"


async def test_retries_follow_the_schedule_with_one_id_and_the_vm_as_it_was(db: Database) -> None:
    with CallbackReceiver(fail_first=2).running() as receiver:
        async with delivering(db, (0, 0.2, 0.4), SECRET) as (deliveries, ended):
            vm = vm_for(receiver.url)
            await deliveries.send(vm)
            await until_ended(ended)
    assert ended == ["delivered"] and receiver.attempts == 3
    assert len({headers["webhook-id"] for headers in receiver.headers}) == 1
    first, second, third = receiver.times
    assert second - first >= 0.19 and third - second >= 0.39
    assert receiver.bodies == [vm.model_dump(mode="json")]
    assert (
        await db.read(lambda c: delivery_records.next_at(c, "test-host")) is None
    )  # nothing left to deliver


async def test_retry_after_puts_the_next_attempt_no_sooner(db: Database) -> None:
    with CallbackReceiver(fail_first=1, retry_after="1").running() as receiver:
        async with delivering(db, (0, 0.01)) as (deliveries, ended):
            sent = time.monotonic()
            await deliveries.send(vm_for(receiver.url))
            await until_ended(ended)
            took = time.monotonic() - sent
    assert ended == ["delivered"] and receiver.attempts == 2
    assert took >= 0.95


async def test_a_receiver_that_answers_410_gets_no_more(db: Database) -> None:
    with CallbackReceiver(fail_first=10**6, fail_status=410).running() as receiver:
        async with delivering(db, (0, 0.01, 0.01, 0.01)) as (deliveries, ended):
            await deliveries.send(vm_for(receiver.url))
            await until_ended(ended)
            await deliveries.send(vm_for(receiver.url))
            await until_ended(ended, 2)
    assert ended == ["gone", "gone"] and receiver.attempts == 2


async def test_a_receiver_that_never_answers_well_gets_each_attempt_then_is_let_go(
    db: Database,
) -> None:
    with CallbackReceiver(fail_first=10**6).running() as receiver:
        async with delivering(db, (0, 0.01, 0.01)) as (deliveries, ended):
            await deliveries.send(vm_for(receiver.url))
            await until_ended(ended)
    assert ended == ["failed"] and receiver.attempts == 3
    assert await db.read(lambda c: delivery_records.next_at(c, "test-host")) is None


async def test_a_receiver_that_is_down_across_a_restart_still_gets_its_callback(
    db: Database,
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/vm-ready"
    schedule = (0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5)
    async with delivering(db, schedule) as (deliveries, ended):  # the service before
        await deliveries.send(vm_for(url))
        async with asyncio.timeout(10):
            while (await db.read(lambda c: delivery_records.due(c, "test-host", after(60), 1)))[
                0
            ].attempts < 2:
                await asyncio.sleep(0.05)  # two attempts refused: nothing listens
    assert ended == []
    with CallbackReceiver(port=port).running() as receiver:
        async with delivering(db, schedule) as (_, ended):  # the service, restarted
            await until_ended(ended)
    assert ended == ["delivered"] and len(receiver.bodies) == 1


async def test_a_forbidden_callback_address_is_not_contacted_or_retried(db: Database) -> None:
    transport = PolicyTransport(OutboundPolicy(allow_private=True))
    async with httpx.AsyncClient(transport=transport) as http:
        tried = await attempt(http, "http://169.254.169.254/latest", b"{}", new_message_id())
    assert tried.outcome is Outcome.REFUSED
