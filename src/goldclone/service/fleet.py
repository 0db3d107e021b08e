"""This host among the services that share one database: its ID, its heartbeat, the hosts
that ``GET /hosts`` lists, and what one host does about another's VMs.

A host is ``lost`` once its last heartbeat is older than ``host_lost_after``; that is decided
when it is read, so that every host agrees without any of them having to mark it. The VMs of
a lost host are shown ``unknown`` (never re-created elsewhere, nor forgotten) until it comes
back and adopts them, or until an operator forgets it (``DELETE /hosts/{id}``), which ends
them in ``error`` (``host-lost``). A DELETE of a VM that another host runs is asked through
the store (the VM becomes ``deleting``) and done by that host, which hears of it at once
(``store.listener``, or its next check); the answer comes when the VM is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import socket
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from goldclone.clock import after, now, rfc3339_ms
from goldclone.errors import HostLost, StateConflict, VMNotFound
from goldclone.models import VM, Host, HostState, Phase, Resources, Status
from goldclone.settings import Settings, host_memory_mb
from goldclone.store import event_log, host_records, vm_records
from goldclone.store.database import Database
from goldclone.store.host_records import HostRecord

log = logging.getLogger(__name__)

HOST_ID_FILE = "host-id"


def host_id_of(settings: Settings) -> str:
    """The configured host ID, or the one kept in the data dir: made at its first start from
    the machine's name and random hex, so that two data dirs on one machine differ."""
    if settings.host_id is not None:
        return settings.host_id
    path = settings.data_dir / HOST_ID_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    name = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname().split(".")[0])[:40] or "host"
    made = f"{name}-{secrets.token_hex(4)}"
    partial = path.with_name(f".{HOST_ID_FILE}.partial")
    partial.write_text(f"{made}\n")
    os.replace(partial, path)  # never a half-written ID
    return made


class Fleet:
    """This host's record among the hosts, and its view of the others."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        driver_name: str,
        bounds: dict[str, Any],
        images: Callable[[], dict[str, list[str]]],
    ) -> None:
        self._db = db
        self._images = images
        self._interval = settings.heartbeat_interval
        self._lost_after = settings.host_lost_after
        self._offer: dict[str, Any] = {
            "name": socket.gethostname(),
            "started_at": rfc3339_ms(now()),
            "driver": driver_name,
            "network_types": bounds["network_types"],
            "bounds": bounds,
            "capacity": settings.limits.totals(),
            "machine": {"vms": None, "cpus": os.cpu_count(), "memory": host_memory_mb()},
            "url": settings.advertise_url,
        }
        self._task: asyncio.Task[None] | None = None
        self._soon = asyncio.Event()
        self._held: dict[str, list[str]] | None = None
        """The images last offered; ``None`` once they changed (read again at the next beat)."""

    @property
    def host_id(self) -> str:
        return self._db.host_id

    async def start(self) -> None:
        """Register this host (its first heartbeat), and keep beating in the background."""
        await self._beat()
        self._task = asyncio.create_task(self._beating(), name="heartbeat")

    def changed(self) -> None:
        """What this host holds has changed (an image): say so at once, not at the next
        heartbeat."""
        self._held = None
        self._soon.set()

    async def _beat(self) -> None:
        if self._held is None:  # each image's metadata is on disk: not read every beat
            self._held = self._images()
        offer = {**self._offer, "images": self._held}

        async def beat(conn: AsyncConnection) -> None:
            await host_records.beat(conn, self.host_id, offer)
            await event_log.trim(conn)  # here, not with each event: off the creates' path

        await self._db.write(beat)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _beating(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._soon.wait()
            self._soon.clear()
            try:
                await self._beat()
            except Exception as exc:  # whatever the database driver raises: try again
                log.warning("the heartbeat could not be written (%s); trying again", exc)

    async def hosts(self) -> list[Host]:
        since = self._since()
        return [_host(record, since) for record in await self._db.read(host_records.every)]

    async def forget(self, host_id: str) -> list[VM]:
        """Forget a lost host (``host_records.forget``); the VMs it ended."""
        since = self._since()
        ended = await self._db.write(lambda conn: host_records.forget(conn, host_id, since))
        log.warning("forgot host %s; %d of its VMs ended as host-lost", host_id, len(ended))
        return ended

    async def seen(self, vms: Sequence[VM]) -> list[VM]:
        """``vms`` as they are known: those of a lost host ``unknown``, with the reason."""
        silent = await self._silent()
        return [_unknown(vm, silent[vm.host]) if vm.host in silent else vm for vm in vms]

    async def url_of(self, host_id: str) -> str | None:
        """Where host ``host_id`` says other hosts reach its API; ``None`` if it says not."""
        offer = await self._db.read(lambda conn: host_records.offer_of(conn, host_id))
        url = (offer or {}).get("url")
        return str(url) if url else None

    def is_mine(self, vm: VM) -> bool:
        return vm.host == self.host_id

    async def forgotten(self, vm: VM) -> bool:
        """Whether ``vm``'s host was forgotten (``DELETE /hosts/{id}``)."""
        if (host := vm.host) is None:
            return False
        return await self._db.read(lambda conn: host_records.heartbeat_of(conn, host)) is None

    async def delete_elsewhere(self, vm: VM) -> None:
        """Have the host that runs ``vm`` destroy it, and return once it is gone. Raises
        ``HostLost`` if that host is lost (now, or while it is waited for)."""
        await self.refuse_if_lost(vm)
        try:
            await self._db.write(lambda conn: vm_records.change(
                conn, vm.id, tuple(Status), Phase.DELETING, Status.DELETING
            ))  # fmt: skip
        except VMNotFound:
            return
        with self._db.changes.watching(vm.id) as change:
            while True:
                try:
                    vm = await self._db.read(partial(vm_records.get, vm_id=vm.id))
                except VMNotFound:
                    return
                if vm.status is not Status.DELETING:  # its hypervisor refused; it is put back
                    raise StateConflict(
                        f"VM {vm.id}: its host {vm.host} could not destroy it",
                        vm=vm.id,
                        host=vm.host,
                    )
                await self.refuse_if_lost(vm)
                await change.wait(self._interval)

    async def refuse_if_lost(self, vm: VM) -> None:
        """Raise ``HostLost`` if ``vm``'s host is lost."""
        silent = await self._silent()
        if vm.host in silent:
            raise HostLost(
                f"VM {vm.id} is on host {vm.host}, not heard from since "
                f"{rfc3339_ms(silent[vm.host])}: it "
                f"can be deleted once that host is back, or ended by forgetting the host "
                f"(DELETE /hosts/{vm.host})",
                vm=vm.id,
                host=vm.host,
            )

    async def _silent(self) -> dict[str, datetime]:
        since = self._since()
        return await self._db.read(lambda conn: host_records.silent(conn, since))

    def _since(self) -> datetime:
        return after(-self._lost_after)


def _host(record: HostRecord, since: datetime) -> Host:
    offer = record.host
    capacity = Resources.model_validate(offer["capacity"])
    used = Resources(vms=len(record.held), cpus=sum(h.cpus for h in record.held),
                     memory=sum(h.memory for h in record.held))  # fmt: skip
    free = Resources(
        **{
            part: None if total is None else max(total - (getattr(used, part) or 0), 0)
            for part, total in capacity.model_dump().items()
        }
    )
    return Host(
        id=record.id,
        name=offer["name"],
        state=HostState.LOST if record.heartbeat_at < since else HostState.UP,
        started_at=offer["started_at"],
        heartbeat_at=record.heartbeat_at,
        driver=offer["driver"],
        network_types=offer["network_types"],
        capacity=capacity,
        used=used,
        free=free,
        machine=Resources.model_validate(offer["machine"]),
        images=sorted(offer.get("images", {})),
        url=offer.get("url"),
    )


def _unknown(vm: VM, heartbeat_at: datetime) -> VM:
    reason = f"its host {vm.host} has not been heard from since {rfc3339_ms(heartbeat_at)}"
    return vm.model_copy(update={"status": Status.UNKNOWN, "status_reason": reason})
