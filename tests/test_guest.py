"""Guest configuration on real QEMU guests: the demo guest reads its NoCloud seed and fw_cfg,
and no secret shows up in the API, the server log, the console's headers or a command line."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ssh_key
from tests.harness import Goldclone, leftovers, processes_mentioning
from tests.servers import CallbackReceiver

pytestmark = pytest.mark.root

SECRET_FILE = "user-data-secret-5e1f"
USER_DATA = f"#!/bin/sh\necho {SECRET_FILE} > /www/hello.txt\n"
METADATA = {"coordinator": "metadata-secret-a11ce", "job.token": "metadata-secret-b0b"}
SECRETS = (SECRET_FILE, *METADATA.values())


async def test_the_demo_guest_is_told_its_name_keys_script_and_metadata(
    goldclone: Goldclone,
    demo_body: dict[str, Any],
    callbacks: CallbackReceiver,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    _, key = ssh_key(tmp_path)
    body = {**demo_body, "name": "builder-7", "ssh_authorized_keys": [key],
            "user_data": USER_DATA, "metadata": METADATA,
            "callback_url": callbacks.url}  # fmt: skip
    vm = await goldclone.boot(body)
    assert vm["status"] == "running", vm
    async with httpx.AsyncClient(timeout=10) as guest:
        page = (await guest.get(f"http://{vm['ip_address']}/")).text
        written = (await guest.get(f"http://{vm['ip_address']}/hello.txt")).text
    assert "hostname builder-7" in page.splitlines()
    assert f"ssh-key {key}" in page.splitlines()
    assert all(f'"{k}": "{v}"' in page for k, v in METADATA.items()), page  # through fw_cfg
    assert written == f"{SECRET_FILE}\n"  # the user-data script ran
    console = await goldclone.client.get(f"/vms/{vm['id']}/console")
    assert "hostname builder-7, 1 SSH keys" in console.text

    vm_dir = goldclone.data_dir / "vms" / vm["id"]
    assert {p.name: p.stat().st_mode & 0o777 for p in vm_dir.glob("*.iso")} == {"seed.iso": 0o600}
    [callback] = await asyncio.to_thread(callbacks.wait_for, 1, 10)
    seen = {
        "GET": (await goldclone.client.get(f"/vms/{vm['id']}")).text,
        "list": (await goldclone.client.get("/vms")).text,
        "callback": str(callback),
        "console headers": str(console.headers),
        "log": "\n".join(record.getMessage() for record in caplog.records),
    }
    for secret in SECRETS:
        assert [where for where, text in seen.items() if secret in text] == [], secret
        assert processes_mentioning(secret) == []  # qemu reads them from files
    await goldclone.delete(vm["id"])
    assert leftovers(goldclone.data_dir, vm) == []


async def test_the_demo_guest_has_its_derived_hostname_without_a_name_and_its_disk_size(
    goldclone: Goldclone, demo_body: dict[str, Any]
) -> None:
    vm = await goldclone.boot({**demo_body, "disk_size": 1})
    assert (vm["status"], vm["disk_size"]) == ("running", 1), vm
    async with httpx.AsyncClient(timeout=10) as guest:
        page = (await guest.get(f"http://{vm['ip_address']}/")).text
    assert f"hostname {vm['hostname']}" in page.splitlines()
    assert "metadata {}" in page.splitlines()
    assert f"disk {1 << 30}" in page.splitlines()  # grown from the image's 64 MiB
    await goldclone.delete(vm["id"])
