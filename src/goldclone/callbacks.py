"""Telling a client's ``callback_url`` that its VM is ready or has failed."""

from __future__ import annotations

import asyncio
import logging

import httpx

from goldclone.models import VM

log = logging.getLogger(__name__)


async def deliver(
    http: httpx.AsyncClient, vm: VM, attempts: int = 5, backoff: float = 0.5, timeout: float = 10.0
) -> bool:
    """POST the VM object to its callback URL, retrying with exponential backoff.

    Any 2xx answer counts as delivered. Returns whether it was; never raises, since a
    failed callback must not harm the VM.
    """
    if vm.callback_url is None:
        return True
    body = vm.model_dump_json().encode()
    headers = {"Content-Type": "application/json"}
    for attempt in range(1, attempts + 1):
        try:
            response = await http.post(
                vm.callback_url, content=body, headers=headers, timeout=timeout
            )
            if response.is_success:
                return True
            reason = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            reason = str(exc) or type(exc).__name__
        log.warning("callback for VM %s, attempt %d of %d: %s", vm.id, attempt, attempts, reason)
        if attempt < attempts:
            await asyncio.sleep(backoff * 2 ** (attempt - 1))
    return False
