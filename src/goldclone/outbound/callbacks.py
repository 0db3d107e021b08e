"""Telling a client's ``callback_url`` that its VM is ready or has failed.

With a secret configured, every delivery is signed as Standard Webhooks describes: the headers
``webhook-id`` (the same on every retry of one delivery), ``webhook-timestamp`` (Unix
seconds) and ``webhook-signature`` (``v1,`` and the base64 HMAC-SHA256 of
``id.timestamp.body``). A secret written as ``whsec_<base64>`` is that base64's bytes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import hashlib
import hmac
import logging
import random
import time
import uuid

import httpx

from goldclone.errors import URLForbidden
from goldclone.models import VM

log = logging.getLogger(__name__)

MAX_RETRY_AFTER = 300.0


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


async def deliver(
    http: httpx.AsyncClient,
    vm: VM,
    attempts: int = 5,
    backoff: float = 0.5,
    secret: str | None = None,
    timeout: float = 10.0,
) -> bool:
    """POST the VM object to its callback URL, retrying with jittered exponential backoff.

    Any 2xx answer counts as delivered; a ``Retry-After`` answer sets the next wait (up to
    five minutes). Returns whether it was delivered; never raises, since a failed callback
    must not harm the VM.
    """
    if vm.callback_url is None:
        return True
    body = vm.model_dump_json().encode()
    message_id = f"msg_{uuid.uuid4().hex}"
    key = signing_key(secret) if secret else None
    for attempt in range(1, attempts + 1):
        headers = {"Content-Type": "application/json"}
        if key is not None:
            timestamp = int(time.time())
            headers |= {
                "webhook-id": message_id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": sign(key, message_id, timestamp, body),
            }
        wait = backoff * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)
        try:
            response = await http.post(vm.callback_url, content=body, headers=headers,
                                       timeout=timeout)  # fmt: skip
            if response.is_success:
                return True
            reason = f"HTTP {response.status_code}"
            wait = min(_retry_after(response) or wait, MAX_RETRY_AFTER)
        except URLForbidden as exc:
            log.warning("callback for VM %s not sent: %s", vm.id, exc.message)
            return False
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            reason = str(exc) or type(exc).__name__
        log.warning("callback for VM %s, attempt %d of %d: %s", vm.id, attempt, attempts, reason)
        if attempt < attempts:
            await asyncio.sleep(wait)
    return False
