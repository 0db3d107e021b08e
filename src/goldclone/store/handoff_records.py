"""VMs that one host placed on another, with the requests that made them, until that host
takes them."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from goldclone.models import VM
from goldclone.store.tables import handoffs as _handoffs
from goldclone.store.tables import vms as _vms


async def add(conn: AsyncConnection, vm_id: str, host_id: str, request: str) -> None:
    """Hand the VM to ``host_id``, with its ``request`` (JSON)."""
    await conn.execute(_handoffs.insert().values(vm_id=vm_id, host_id=host_id, request=request))


async def waiting(conn: AsyncConnection, host_id: str) -> list[tuple[str, str]]:
    """The IDs of the VMs handed to ``host_id``, with their requests."""
    query = select(_handoffs.c.vm_id, _handoffs.c.request).where(_handoffs.c.host_id == host_id)
    return [(row.vm_id, row.request) for row in await conn.execute(query)]


async def take(conn: AsyncConnection, vm_ids: list[str]) -> dict[str, VM]:
    """Forget the handoffs of ``vm_ids``; the VMs of them still recorded, by ID."""
    await conn.execute(_handoffs.delete().where(_handoffs.c.vm_id.in_(vm_ids)))
    vms = select(_vms.c.id, _vms.c.vm).where(_vms.c.id.in_(vm_ids))
    return {row.id: VM.model_validate(row.vm) for row in await conn.execute(vms)}


async def drop(conn: AsyncConnection, vm_id: str) -> None:
    """Forget the VM's handoff, if it has one."""
    await conn.execute(_handoffs.delete().where(_handoffs.c.vm_id == vm_id))
