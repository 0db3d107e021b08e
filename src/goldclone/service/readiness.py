"""Whether a guest is ready for work, by its ``ready_when`` probe: a TCP port that accepts a
connection, an HTTP GET that answers any status below 500, or the guest agent's ping. Probes
go straight to the guest (its address is ours), every second until the timeout."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import httpx

from goldclone.errors import NotReady
from goldclone.models import ReadyWhen
from goldclone.polling import until

PROBE_INTERVAL = 1.0
PROBE_TIMEOUT = 3.0


async def wait_ready(
    ip: str, ready_when: ReadyWhen, timeout: float, agent_ping: Callable[[], Awaitable[bool]]
) -> None:
    """Return once the guest at ``ip`` passes ``ready_when``; ``NotReady`` after ``timeout``
    seconds."""

    async def passes() -> bool:
        if ready_when.tcp is not None:
            return await _tcp(ip, ready_when.tcp)
        if ready_when.http is not None:
            return await _http(ip, ready_when.http.port, ready_when.http.path)
        return await agent_ping()

    try:
        await until(passes, interval=PROBE_INTERVAL, timeout=timeout)
    except TimeoutError:
        raise NotReady(
            f"{ready_when.describe()} of the guest at {ip} did not answer within {timeout:g} s"
        ) from None


async def _tcp(ip: str, port: int) -> bool:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            _, writer = await asyncio.open_connection(ip, port)
    except (OSError, TimeoutError):
        return False
    await _close(writer)
    return True


async def _http(ip: str, port: int, path: str) -> bool:
    """Whether ``GET path`` answers with a status below 500; redirects are not followed, and
    no proxy of the environment is used: the guest is on our own network. The request is plain
    HTTP, so the client loads no CA certificates, which the event loop would pay for at every
    probe."""
    try:
        async with httpx.AsyncClient(
            timeout=PROBE_TIMEOUT, trust_env=False, verify=False
        ) as client:
            response = await client.get(f"http://{ip}:{port}{path}")
    except httpx.HTTPError:
        return False
    return response.status_code < 500


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
