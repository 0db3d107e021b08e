"""What the service watches on its running VMs between the periodic checks: a host disk that
filled (its guests paused), and the guests of ``on_poweroff: delete`` that powered off."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil

from goldclone.drivers.base import Driver
from goldclone.errors import StateConflict, VMNotFound
from goldclone.models import VM, Status
from goldclone.service.lifecycle import Lifecycle
from goldclone.settings import Settings

log = logging.getLogger(__name__)

DISK_CHECK = 2.0
"""Seconds between two looks at the data dir's free space (``Watches.disks``)."""
POWEROFF_CHECK = 2.0
"""Seconds between two looks at the guests of ``on_poweroff: delete`` (``Watches.poweroffs``)."""
DISK_FULL_REASON = (
    "paused: its disk could not be written, since the host's disk is full; it goes on by "
    "itself once there is room again"
)


class Watches:
    """The watches of this host's running VMs; each runs until the service closes."""

    def __init__(self, settings: Settings, driver: Driver, lifecycle: Lifecycle) -> None:
        self._settings = settings
        self._driver = driver
        self._lifecycle = lifecycle

    async def disks(self) -> None:
        """Every ``DISK_CHECK`` seconds, while the data dir's disk has no more than the
        reserve free, or a VM is paused for it, ask the running VMs whether their hypervisor
        paused them because their disk could not be written: say so on each
        (``status_reason``), and let each go on once the disk has room again. A disk with
        room costs one ``statvfs``."""
        stalled: set[str] = set()
        while True:
            await asyncio.sleep(DISK_CHECK)
            usage = await asyncio.to_thread(shutil.disk_usage, self._settings.data_dir)
            room = usage.free > self._settings.reserve_mb << 20
            if room and not stalled:
                continue
            try:
                running = [v for v in await self._lifecycle.mine() if v.status is Status.RUNNING]
                asked = [vm for vm in running if not room or vm.id in stalled]
                stalled = {vm.id for vm in asked if await self._disk(vm, room)}
            except Exception:
                log.exception("checking the VMs' disks failed; trying again")

    async def poweroffs(self) -> None:
        """Every ``POWEROFF_CHECK`` seconds, ``refresh`` this host's running VMs of
        ``on_poweroff: delete``, so that one whose guest powered off is deleted soon, not at
        the periodic check: a read of the store, and a look at each such VM's process."""
        while True:
            await asyncio.sleep(POWEROFF_CHECK)
            try:
                for vm in await self._lifecycle.mine():
                    if vm.status is Status.RUNNING and vm.on_poweroff == "delete":
                        await self._lifecycle.refresh(vm)
            except Exception:
                log.exception("checking the VMs that end at their power-off failed; trying again")

    async def _disk(self, vm: VM, room: bool) -> bool:
        """Whether ``vm`` stays paused for its disk; say so on it, and resume it if ``room``."""
        machine = await self._lifecycle.machine(vm.id)
        stalled = await self._driver.disk_stalled(machine)
        if stalled and room:
            log.info("VM %s: its host's disk has room again; it goes on", vm.id)
            await self._driver.resume(machine)
            stalled = False
        wanted = DISK_FULL_REASON if stalled else None
        if vm.status_reason != wanted and (stalled or vm.status_reason == DISK_FULL_REASON):
            if stalled:
                log.warning("VM %s is paused: its disk could not be written (the host's disk "
                            "is full)", vm.id)  # fmt: skip
            with contextlib.suppress(StateConflict, VMNotFound):
                await self._lifecycle.amend(vm.id, Status.RUNNING, status_reason=wanted)
        return stalled
