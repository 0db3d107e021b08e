"""Who a request relayed from another host of the fleet comes from: the caller that the first
host authenticated, carried in a header that the fleet's shared secret signs (HMAC-SHA256),
good for ``MAX_AGE`` seconds, so that the VM's own host acts for that caller and no other."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping

from goldclone.access import NAME, Principal, Role

HEADER = "X-Goldclone-Relay"
SIGNATURE = "X-Goldclone-Relay-Signature"
MAX_AGE = 60.0
"""Seconds a relayed request's signature stays good (the hosts' clocks must agree within it)."""
MIN_SECRET = 32


class RelayRefused(Exception):
    """A relay header that does not verify, or says what it may not; the message says why."""


def sign(secret: str, who: Principal, host_id: str, at: float | None = None) -> dict[str, str]:
    """The headers that carry ``who`` from host ``host_id`` to another host."""
    claims = {"name": who.name, "role": who.role.value, "tenant": who.tenant, "from": host_id,
              "at": round(time.time() if at is None else at, 3)}  # fmt: skip
    value = base64.urlsafe_b64encode(json.dumps(claims, sort_keys=True).encode()).decode()
    return {HEADER: value, SIGNATURE: _mac(secret, value)}


def verify(secret: str, headers: Mapping[str, str], now: float | None = None) -> Principal:
    """The caller that relayed ``headers`` carry; raises ``RelayRefused``."""
    value, signature = headers.get(HEADER, ""), headers.get(SIGNATURE, "")
    if not hmac.compare_digest(_mac(secret, value), signature):
        raise RelayRefused("a relayed request whose signature does not verify")
    try:
        claims = json.loads(base64.urlsafe_b64decode(value.encode()))
        role, at = Role(claims["role"]), float(claims["at"])
        name, tenant, origin = str(claims["name"]), str(claims["tenant"]), str(claims["from"])
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise RelayRefused("a relayed request whose caller cannot be read") from None
    if abs((time.time() if now is None else now) - at) > MAX_AGE:
        raise RelayRefused(f"a relayed request signed more than {MAX_AGE:g} s from now")
    if not NAME.fullmatch(tenant):
        raise RelayRefused("a relayed request for no tenant")
    return Principal(f"{name} (through {origin})", role, tenant, relayed=True)


def _mac(secret: str, value: str) -> str:
    return hmac.new(secret.encode(), value.encode(), hashlib.sha256).hexdigest()
