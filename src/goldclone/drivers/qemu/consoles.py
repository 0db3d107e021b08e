"""Every guest's console log, and its QEMU's log, kept to its last bytes, however fast the
guest writes."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from goldclone.host.tails import keep_tail

log = logging.getLogger(__name__)

INTERVAL = 1.0
"""Seconds between two looks at every console: a file may pass its bound by what its guest
writes in that time."""


def _keep_all(vms_dir: Path, most: int) -> None:
    # QEMU's own log too: a guest can make it print warnings as fast as it likes
    for path in [*vms_dir.glob("*/console.log"), *vms_dir.glob("*/qemu.log")]:
        try:
            if keep_tail(path, most):
                log.debug("console %s cut to its last bytes", path)
        except OSError as exc:  # the VM is being removed, or the filesystem refuses
            log.warning("console %s could not be cut: %s", path, exc)


async def keep_consoles(vms_dir: Path, most: int) -> None:
    """Every ``INTERVAL`` seconds, cut each console log in ``vms_dir`` past ``most`` bytes to
    about half of that, the oldest output first (``host.tails``)."""
    while True:
        await asyncio.to_thread(_keep_all, vms_dir, most)
        await asyncio.sleep(INTERVAL)
