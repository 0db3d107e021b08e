"""Recovery: what a service finds at start, and the periodic check of the host against the
store.

At start, guests that kept running are adopted; creates and deletes that a stopped service
left half-done are finished in the background. Then, now and every ``reconcile_interval``
seconds, whatever the driver finds of a machine the store does not know is removed, and
guests that are gone become ``stopped``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from goldclone.drivers.base import Driver
from goldclone.errors import Interrupted, VMNotFound
from goldclone.models import Status
from goldclone.service.lifecycle import Lifecycle
from goldclone.service.watches import Watches
from goldclone.store import host_records, leftover_records, vm_records
from goldclone.store.database import Database
from goldclone.store.event_log import host_subject
from goldclone.store.leftover_records import Leftover

log = logging.getLogger(__name__)


class Recovery:
    """Brings the host and the store back into agreement."""

    def __init__(
        self,
        db: Database,
        driver: Driver,
        lifecycle: Lifecycle,
        reconcile_interval: float,
        watches: Watches,
    ) -> None:
        self._db = db
        self._driver = driver
        self._lifecycle = lifecycle
        self._interval = reconcile_interval
        self._watches = watches

    async def start(self) -> None:
        """Adopt the guests that kept running; finish the rest in the background, so that no
        guest can hold up the API."""
        unfinished = []
        for vm in await self._lifecycle.mine():
            if vm.status is Status.RUNNING:
                await self._adopt(vm.id)
            elif vm.status in (Status.CREATING, Status.DELETING):
                unfinished.append(vm.id)
        self._lifecycle.spawn(self._maintain(unfinished))

    async def _adopt(self, vm_id: str) -> None:
        """Take over a guest that kept running through a restart; one that did not is
        ``stopped``."""
        if (runtime := await self._lifecycle.runtime(vm_id)) is not None:
            await self._driver.adopt(runtime)
        await self._lifecycle.refresh(await self._lifecycle.get(vm_id))

    async def _maintain(self, unfinished: list[str]) -> None:
        await asyncio.gather(*(self._finish(vm_id) for vm_id in unfinished))
        self._lifecycle.spawn(self._db.changes.follow(
            self._deletes_asked, "reading the VMs to delete", host_subject(self._db.host_id)
        ))  # fmt: skip
        self._lifecycle.spawn(self._watches.disks())
        self._lifecycle.spawn(self._watches.poweroffs())
        while True:
            await self.reconcile()
            await asyncio.sleep(self._interval)

    async def _deletes_asked(self) -> None:
        """Destroy this host's VMs that another host's DELETE made ``deleting``."""
        host_id = self._db.host_id
        for vm_id in await self._db.read(lambda conn: vm_records.deleting(conn, host_id)):
            if not self._lifecycle.lock(vm_id).locked():
                self._lifecycle.spawn(self._finish(vm_id))

    async def _finish(self, vm_id: str) -> None:
        """An interrupted create (one not under way here) ends in ``error`` (``interrupted``)
        with everything of it removed and its callback sent; an interrupted DELETE is
        completed."""
        lifecycle = self._lifecycle
        try:
            async with lifecycle.lock(vm_id):
                vm = await lifecycle.get(vm_id)
                if vm.status is Status.CREATING and not await lifecycle.creating(vm_id):
                    stopped = Interrupted("the service stopped while this VM was being created")
                    await lifecycle.report(await lifecycle.fail(vm, stopped))
                elif vm.status is Status.DELETING:
                    await lifecycle.finish_delete(vm_id)
        except VMNotFound:
            pass  # a DELETE came first
        except Exception:
            log.exception("could not finish VM %s; the next start tries again", vm_id)

    async def reconcile(self) -> None:
        """Retry what teardowns left, finish DELETEs that the hypervisor refused, destroy
        whatever the store does not know, and mark guests that are gone ``stopped``. A failed
        pass is logged, and the next one tries again."""
        try:
            await self._retry_leftovers()
            for vm in await self._lifecycle.mine():
                if vm.status is Status.DELETING and not self._lifecycle.lock(vm.id).locked():
                    await self._finish(vm.id)
            await self._driver.remove_orphans(self._machines)
            for vm in await self._lifecycle.mine():
                with contextlib.suppress(VMNotFound):
                    await self._lifecycle.refresh(vm)
        except Exception:
            log.exception("checking the host against the store failed")

    async def _retry_leftovers(self) -> None:
        host_id = self._db.host_id
        for leftover in await self._db.read(lambda conn: leftover_records.of_host(conn, host_id)):
            runtime = (
                self._driver.runtime_from_record(leftover.machine, leftover.runtime)
                if leftover.runtime
                else None
            )
            try:
                await self._driver.destroy(leftover.machine, runtime)
            except Exception as exc:
                log.warning(
                    "VM %s: retry %d of its cleanup failed again (%s); the next check tries "
                    "again", leftover.vm_id, leftover.attempts + 1, exc,
                )  # fmt: skip
                await self._done(leftover, str(exc))
                continue
            log.info("VM %s: retry %d of its cleanup removed what was left (%s)",
                     leftover.vm_id, leftover.attempts + 1, leftover.reason)  # fmt: skip
            await self._done(leftover, None)

    async def _done(self, leftover: Leftover, failure: str | None) -> None:
        await self._db.write(lambda conn: leftover_records.done(conn, leftover, failure))

    async def _machines(self) -> set[str]:
        """The machines that this host's store knows (``host_records.machines``)."""
        host_id = self._db.host_id
        return await self._db.read(lambda conn: host_records.machines(conn, host_id))
