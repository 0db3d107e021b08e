"""A VM whose QEMU fails says why: QEMU's own last words and how it ended are in the VM's
error, and the end of its console is kept in the store after its folder is gone. Real QEMU,
behind stand-ins that make it fail (a QEMU that refuses to start, one killed as its guest
boots), the way a broken host or a crashing QEMU would."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from goldclone.settings import Settings
from tests.conftest import checksum
from tests.harness import goldclone_server, leftovers
from tests.servers import FileServer
from tests.test_vms import small

pytestmark = pytest.mark.root

REFUSES = """#!/bin/sh
case "$*" in *"-name goldclone-"*) ;; *) exec {qemu} "$@";; esac
echo "qemu-system-x86_64: -drive file=disk.qcow2: Could not open: boom" >&2
exit 3
"""
"""A QEMU that starts no machine of goldclone's: it says why and exits 3 (other uses of QEMU,
such as the driver's probes, get the real one)."""
KILLED_WHILE_BOOTING = """#!/bin/sh
case "$*" in *"-name goldclone-"*) ;; *) exec {qemu} "$@";; esac
console=$(printf '%s\\n' "$@" | sed -n 's/^file,id=console0,path=\\(.*\\),append=on$/\\1/p')
{qemu} "$@" & pid=$!
while [ ! -s "$console" ] && kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
kill -9 "$pid"
wait "$pid"
"""
"""A QEMU that is killed (SIGKILL) once its guest has written to its console: long before the
guest has an address."""


def stand_in(workdir: Path, name: str, script: str) -> str:
    path = workdir / name
    path.write_text(script.format(qemu=shutil.which("qemu-system-x86_64")))
    path.chmod(0o755)
    return str(path)


async def test_a_qemu_that_cannot_start_says_why_and_leaves_nothing(
    settings: Settings, workdir: Path, file_server: FileServer, demo_package: Path
) -> None:
    qemu = stand_in(workdir, "qemu-refuses", REFUSES)
    async with goldclone_server(dataclasses.replace(settings, qemu_binary=qemu)) as goldclone:
        vm = await goldclone.boot(small(file_server.url(demo_package.name), checksum(demo_package)))
        assert vm["status"] == "error" and vm["error"]["code"] == "boot-failed", vm
        message = vm["error"]["message"]
        assert "it exited with status 3" in message and "Could not open: boom" in message
        assert leftovers(goldclone.data_dir, vm) == []


async def test_a_qemu_killed_as_its_guest_boots_says_so_and_its_console_outlives_its_folder(
    settings: Settings, workdir: Path, file_server: FileServer, demo_package: Path
) -> None:
    qemu = stand_in(workdir, "qemu-killed", KILLED_WHILE_BOOTING)
    async with goldclone_server(dataclasses.replace(settings, qemu_binary=qemu)) as goldclone:
        body: dict[str, Any] = small(file_server.url(demo_package.name), checksum(demo_package))
        vm = await goldclone.boot(body)
        assert vm["status"] == "error" and vm["error"]["code"] == "boot-failed", vm
        assert "killed by SIGKILL" in vm["error"]["message"], vm["error"]
        assert "exited before the guest got an IP" in vm["error"]["message"]
        assert leftovers(goldclone.data_dir, vm) == []  # its folder too, console and all
        console = await goldclone.client.get(f"/vms/{vm['id']}/console")
        assert console.status_code == 200 and console.text.strip(), console.text
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", console.text)  # as any console
        await goldclone.delete(vm["id"])  # the kept console goes with the VM
        assert (await goldclone.client.get(f"/vms/{vm['id']}/console")).status_code == 404
