"""``GET /vms/{id}/console`` on a real QEMU guest: its boot messages, and following them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.conftest import checksum
from tests.harness import Goldclone
from tests.servers import FileServer

pytestmark = pytest.mark.root


async def test_the_console_streams_the_boot_and_ends_with_the_vm(
    goldclone: Goldclone, file_server: FileServer, demo_package: Path
) -> None:
    image = {"url": file_server.url(demo_package.name), "checksum": checksum(demo_package)}
    vm = await goldclone.post_vm({"image": image, "cpus": 1, "memory": 256})
    await goldclone.wait_for_phase(vm["id"], "booting")
    seen = ""
    async with (
        asyncio.timeout(120),
        goldclone.client.stream("GET", f"/vms/{vm['id']}/console?follow=true") as stream,
    ):
        assert stream.headers["content-type"] == "text/plain; charset=utf-8"
        chunks = stream.aiter_text()
        while "asking for a DHCP lease" not in seen:  # written after the stream began
            seen += await anext(chunks)
        running = await goldclone.wait_for(vm["id"], "running")
        deleted = asyncio.create_task(goldclone.client.delete(f"/vms/{vm['id']}"))
        seen += "".join([chunk async for chunk in chunks])  # ends once the VM is gone
        assert (await deleted).status_code == 204
    assert "goldclone-guest: up, looking for NICs" in seen
    assert f"eth0 {running['mac_address']} found" in seen
    assert "\r" not in seen and "\x1b" not in seen
