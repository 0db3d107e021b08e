"""Memory templates over QMP: saving a booted guest whose RAM is a shared file, and restoring
machines from it whose RAM maps that file privately.

Only the device state goes through the migration stream (``x-ignore-shared`` leaves the shared
RAM in its file): about 0.5 MB, written in a few hundredths of a second. QEMU runs as an
unprivileged user, so the state file is opened here and handed over as a file descriptor.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from goldclone.drivers.base import TemplateFiles
from goldclone.drivers.qemu.qmp import FD_NAME, qmp_execute, qmp_execute_with_fd
from goldclone.errors import QMPError
from goldclone.polling import until

STEP_TIMEOUT = 30.0
POLL = 0.02
_IGNORE_SHARED = {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}


async def save(qmp: Path, nic_id: str, files: TemplateFiles) -> None:
    """Unplug the NIC (clones get their own), pause, write the device state to
    ``files.state``, and quit. The guest must handle PCI hot-unplug (ACPI)."""
    await qmp_execute(qmp, "device_del", {"id": nic_id})

    async def unplugged() -> bool:
        found = await qmp_execute(qmp, "qom-list", {"path": "/machine/peripheral"})
        return all(entry.get("name") != nic_id for entry in found)

    try:
        await until(unplugged, interval=POLL * 5, timeout=STEP_TIMEOUT)
    except TimeoutError:
        raise QMPError("the guest did not release its NIC (no ACPI hot-unplug?)") from None
    await qmp_execute(qmp, "stop")
    await _migrate(qmp, "migrate", files.state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    await _until_status(qmp, "query-migrate", "completed")
    await qmp_execute(qmp, "quit")


async def restore(qmp: Path, files: TemplateFiles, nic: dict[str, str]) -> None:
    """Load the template's device state into a machine started with ``-incoming defer -S``,
    run it, and plug in its own NIC (``nic``: ``device_add``'s arguments, with the template
    NIC's address)."""
    await _migrate(qmp, "migrate-incoming", files.state, os.O_RDONLY)
    await _until_status(qmp, "query-status", "paused")
    await qmp_execute(qmp, "cont")
    await qmp_execute(qmp, "device_add", nic)


async def _migrate(qmp: Path, command: str, state: Path, flags: int) -> None:
    """``command`` (``migrate`` or ``migrate-incoming``) with ``x-ignore-shared``, through
    ``state`` opened here with ``flags``."""
    await qmp_execute(qmp, "migrate-set-capabilities", _IGNORE_SHARED)
    fd = await asyncio.to_thread(os.open, state, flags | os.O_CLOEXEC, 0o600)
    try:
        await qmp_execute_with_fd(qmp, fd, command, {"uri": f"fd:{FD_NAME}"})
    finally:
        os.close(fd)


async def _until_status(qmp: Path, query: str, wanted: str) -> None:
    async def reached() -> bool:
        reply = await qmp_execute(qmp, query)
        status = reply.get("status")
        if status in ("failed", "cancelled", "internal-error"):
            raise QMPError(f"{query} says {status}: {reply.get('error-desc', 'no reason given')}")
        return bool(status == wanted)

    try:
        await until(reached, interval=POLL, timeout=STEP_TIMEOUT)
    except TimeoutError:
        raise QMPError(f"{query} did not reach {wanted} within {STEP_TIMEOUT:g} s") from None
