"""The VM store on real SQLite."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from goldclone.errors import VMNotFound
from goldclone.models import VM, ImageSpec, Phase, Status, TimelineEntry, now_ms, now_s
from goldclone.store import Store


def make_vm() -> VM:
    return VM(
        id=str(uuid.uuid4()),
        image=ImageSpec(url="http://127.0.0.1/x", checksum="0" * 64),
        cpus=1,
        memory=256,
        network_type="nat",
        headless=True,
        callback_url=None,
        created_at=now_s(),
        timeline=[TimelineEntry(phase=Phase.ACCEPTED, at=now_ms())],
    )


async def test_vms_persist_across_reopening_in_the_order_accepted(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"
    store = Store(url)
    await store.open()
    vms = [make_vm() for _ in range(5)]
    for vm in vms:
        await store.insert(vm, {"tap": vm.id[:8]})
    running = vms[2].model_copy(update={"status": Status.RUNNING, "ip_address": "10.0.0.9"})
    await store.save(running)
    await store.close()

    reopened = Store(url)
    await reopened.open()
    listed = await reopened.list()
    assert [vm.id for vm in listed] == [vm.id for vm in vms]
    assert await reopened.get(vms[2].id) == running
    assert await reopened.runtime(vms[0].id) == {"tap": vms[0].id[:8]}
    await reopened.delete(vms[0].id)
    with pytest.raises(VMNotFound):
        await reopened.get(vms[0].id)
    with pytest.raises(VMNotFound):
        await reopened.save(vms[0])
    with pytest.raises(VMNotFound):
        await reopened.runtime(vms[0].id)
    await reopened.close()
