"""The outbound URL policy, with real connections to loopback and none anywhere else."""

from __future__ import annotations

import ipaddress
import re

import httpx
import pytest

from goldclone.errors import URLForbidden
from goldclone.outbound.policy import IPAddress, OutboundPolicy, PolicyTransport, Resolver
from tests.servers import CallbackReceiver

METADATA = [
    "169.254.169.254",
    "169.254.0.1",
    "fd00:ec2::254",
    "::ffff:169.254.169.254",
    "::ffff:a9fe:a9fe",
    "fe80::1",
    "0.0.0.0",
]
PRIVATE = ["127.0.0.1", "10.1.2.3", "192.168.123.4", "172.16.0.1", "100.64.0.1", "::1", "fd12::1"]
PUBLIC = ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"]


@pytest.mark.parametrize("allow_private", [True, False])
@pytest.mark.parametrize("address", METADATA)
def test_link_local_and_metadata_are_always_denied(address: str, allow_private: bool) -> None:
    with pytest.raises(URLForbidden):
        OutboundPolicy(allow_private).check(ipaddress.ip_address(address), "http://x/")


@pytest.mark.parametrize("address", PRIVATE)
def test_private_and_loopback_follow_the_setting(address: str) -> None:
    OutboundPolicy(allow_private=True).check(ipaddress.ip_address(address), "http://x/")
    with pytest.raises(URLForbidden):
        OutboundPolicy(allow_private=False).check(ipaddress.ip_address(address), "http://x/")


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_allowed(address: str) -> None:
    OutboundPolicy(allow_private=False).check(ipaddress.ip_address(address), "http://x/")


def test_literal_urls_are_checked_without_resolving() -> None:
    policy = OutboundPolicy()
    with pytest.raises(URLForbidden):
        policy.check_literal("http://[::ffff:169.254.169.254]/latest/meta-data")
    policy.check_literal("http://images.example.org/x.tar.gz")  # a name: checked on connect


def resolver_for(answers: dict[str, list[str]]) -> Resolver:
    async def resolve(host: str, port: int) -> list[IPAddress]:
        return [ipaddress.ip_address(a) for a in answers.get(host, [host])]

    return resolve


async def test_the_checked_address_is_the_one_connected_to() -> None:
    """``images.test`` resolves nowhere but in this resolver, so an answer proves that the
    connection went to the address that was resolved and checked, with the name kept."""
    with CallbackReceiver().running() as receiver:
        transport = PolicyTransport(OutboundPolicy(), resolver=resolver_for(
            {"images.test": ["127.0.0.1"]}))  # fmt: skip
        async with httpx.AsyncClient(transport=transport) as http:
            response = await http.post(f"http://images.test:{receiver.port}/x", json={})
    assert response.status_code == 204
    assert receiver.headers[0]["host"] == f"images.test:{receiver.port}"


async def test_a_name_with_one_forbidden_address_is_refused() -> None:
    transport = PolicyTransport(OutboundPolicy(), resolver=resolver_for(
        {"rebind.test": ["127.0.0.1", "169.254.169.254"]}))  # fmt: skip
    async with httpx.AsyncClient(transport=transport) as http:
        with pytest.raises(URLForbidden, match=re.escape("169.254.169.254")):
            await http.get("http://rebind.test/")


async def test_every_redirect_hop_is_checked() -> None:
    with CallbackReceiver(fail_first=1, redirect="http://169.254.169.254/latest").running() as rx:
        transport = PolicyTransport(OutboundPolicy())
        async with httpx.AsyncClient(transport=transport, follow_redirects=True) as http:
            with pytest.raises(URLForbidden):
                await http.post(rx.url, json={})
    assert rx.attempts == 1, "the first hop was allowed and made"


async def test_private_addresses_can_be_denied() -> None:
    with CallbackReceiver().running() as receiver:
        transport = PolicyTransport(OutboundPolicy(allow_private=False))
        async with httpx.AsyncClient(transport=transport) as http:
            with pytest.raises(URLForbidden):
                await http.post(receiver.url, json={})
    assert receiver.attempts == 0
