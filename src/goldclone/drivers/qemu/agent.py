"""Work done in a guest through its QEMU guest agent."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

from goldclone.drivers.qemu.qmp import agent_execute
from goldclone.errors import QMPError

_POLL = 0.02
"""Seconds between asks whether the script has exited: a claim from a pool waits for it."""


async def run_script(agent_socket: Path, script: str, timeout: float) -> None:
    """Run ``script`` with ``/bin/sh -s`` in the guest, the script on its standard input;
    raises ``QMPError`` if the agent fails or the script does not exit 0 within ``timeout``
    seconds."""
    started = await agent_execute(agent_socket, "guest-exec", {
        "path": "/bin/sh", "arg": ["-s"], "capture-output": True,
        "input-data": base64.b64encode(script.encode()).decode(),
    })  # fmt: skip
    try:
        async with asyncio.timeout(timeout):
            while not (status := await _status(agent_socket, started["pid"])).get("exited"):
                await asyncio.sleep(_POLL)
    except TimeoutError:
        raise QMPError(f"the guest's script did not finish within {timeout:g} s") from None
    if status.get("exitcode") != 0:
        errors = base64.b64decode(str(status.get("err-data", ""))).decode(errors="replace")
        last = errors.strip().splitlines()[-1:] or ["no message"]
        raise QMPError(f"the guest's script exited with {status.get('exitcode')}: {last[0]}")


async def _status(agent_socket: Path, pid: int) -> dict[str, object]:
    status: dict[str, object] = await agent_execute(agent_socket, "guest-exec-status", {"pid": pid})
    return status
