"""One attempt to tell a client's ``callback_url`` about its VM (``service/deliveries.py``
keeps trying, on a schedule that survives restarts).

With a secret configured, every delivery is signed as Standard Webhooks describes: the headers
``webhook-id`` (the same on every retry of one delivery), ``webhook-timestamp`` (Unix
seconds) and ``webhook-signature`` (``v1,`` and the base64 HMAC-SHA256 of
``id.timestamp.body``). A secret written as ``whsec_<base64>`` is that base64's bytes.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import hmac
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum

import httpx

from goldclone import __version__
from goldclone.errors import URLForbidden

USER_AGENT = f"goldclone/{__version__}"


def signing_key(secret: str) -> bytes:
    """The HMAC key of a secret: ``whsec_<base64>`` decoded, any other string as UTF-8."""
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except binascii.Error:
            pass
    return secret.encode()


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value of one delivery."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def _retry_after(response: httpx.Response) -> float | None:
    """The server's ``Retry-After``, in seconds, whether given as seconds or as a date."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Outcome(StrEnum):
    DELIVERED = "delivered"
    GONE = "gone"
    """The receiver answered 410: it wants no more of these."""
    RETRY = "retry"
    REFUSED = "refused"
    """The URL leads to an address that the outbound policy refuses: never retried."""


@dataclass(frozen=True)
class Attempt:
    outcome: Outcome
    reason: str = ""
    retry_after: float | None = None
    """What the receiver asked to wait, in seconds, with ``Retry-After``."""


async def attempt(
    http: httpx.AsyncClient,
    url: str,
    body: bytes,
    message_id: str,
    secret: str | None = None,
    timeout: float = 10.0,
) -> Attempt:
    """POST ``body`` (JSON) to ``url`` once, signed with ``secret`` if there is one. Any 2xx
    answer is ``DELIVERED``; never raises, since a failed callback must not harm the VM."""
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
    if secret:
        timestamp = int(time.time())
        headers |= {
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(signing_key(secret), message_id, timestamp, body),
        }
    try:
        response = await http.post(url, content=body, headers=headers, timeout=timeout)
    except URLForbidden as exc:
        return Attempt(Outcome.REFUSED, exc.message)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        return Attempt(Outcome.RETRY, str(exc) or type(exc).__name__)
    if response.is_success:
        return Attempt(Outcome.DELIVERED)
    if response.status_code == 410:
        return Attempt(Outcome.GONE, "HTTP 410")
    return Attempt(Outcome.RETRY, f"HTTP {response.status_code}", _retry_after(response))


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"
