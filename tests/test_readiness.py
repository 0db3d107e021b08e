"""``ready_when`` on real QEMU guests: the demo guest's HTTP server and its qemu-ga as the
probe, a port nothing listens on; and DELETE of a guest still booting."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest

from goldclone.settings import Settings
from tests.harness import Goldclone, goldclone_server, leftovers

pytestmark = pytest.mark.root


def phases(vm: dict[str, Any]) -> list[str]:
    return [entry["phase"] for entry in vm["timeline"]]


@pytest.mark.parametrize(
    "ready_when",
    [{"tcp": 80}, {"http": {"port": 80, "path": "/index.cgi?x=1"}}, {"guest_agent": True}],
)
async def test_a_guest_is_running_once_its_probe_passes(
    goldclone: Goldclone, demo_body: dict[str, Any], ready_when: dict[str, Any]
) -> None:
    vm = await goldclone.boot({**demo_body, "ready_when": ready_when})
    assert vm["status"] == "running", vm
    assert phases(vm)[-3:] == ["booting", "ready", "running"]
    await goldclone.delete(vm["id"])
    assert leftovers(goldclone.data_dir, vm) == []


async def test_a_probe_that_never_passes_ends_in_not_ready(
    goldclone: Goldclone, demo_body: dict[str, Any]
) -> None:
    vm = await goldclone.boot({**demo_body, "ready_when": {"tcp": 2222, "timeout": 3}})
    assert vm["status"] == "error", vm
    assert vm["error"]["code"] == "not-ready"
    assert "did not answer within 3 s" in vm["error"]["message"]
    assert "ready" not in phases(vm)
    assert leftovers(goldclone.data_dir, vm) == []


async def test_a_guest_still_booting_is_deleted_without_waiting_for_it(
    settings: Settings, demo_body: dict[str, Any]
) -> None:
    """A guest that has not booted yet cannot act on the power button: DELETE stops it at
    once instead of waiting out the shutdown timeout."""
    async with goldclone_server(dataclasses.replace(settings, shutdown_timeout=60)) as server:
        vm = await server.post_vm(demo_body)
        await server.wait_for_phase(vm["id"], "booting")
        started = time.monotonic()
        await server.delete(vm["id"])
        assert time.monotonic() - started < 15
        assert leftovers(server.data_dir, vm) == []
