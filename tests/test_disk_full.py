"""A full disk refuses or stops an image fetch with ``insufficient-space`` and keeps nothing.

Each test puts the data dir on a small tmpfs of its own; ``make test`` runs the suite in a
private mount namespace, so the mounts never reach the host.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from goldclone.drivers.qemu import disks
from goldclone.settings import Settings
from tests.conftest import checksum
from tests.harness import goldclone_server, leftovers
from tests.servers import FileServer

pytestmark = pytest.mark.root


@contextmanager
def small_disk(settings: Settings, size: str) -> Iterator[Settings]:
    data_dir = settings.data_dir.absolute()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(data_dir)],
                   check=True)  # fmt: skip
    try:
        yield dataclasses.replace(settings, reserve_mb=0)
    finally:
        subprocess.run(["umount", str(data_dir)], check=True)


async def fetch_on(settings: Settings, file_server: FileServer, package: Path) -> str:
    """Create a VM from ``package``; return its error message once it has failed."""
    async with goldclone_server(settings) as goldclone:
        image = {"url": file_server.url(package.name), "checksum": checksum(package)}
        vm = await goldclone.post_vm({"cpus": 1, "memory": 128, "image": image})
        failed = await goldclone.wait_for(vm["id"], "error")
        assert failed["error"]["code"] == "insufficient-space", failed["error"]
        assert leftovers(goldclone.data_dir, failed) == []
        assert list((goldclone.data_dir / "images").iterdir()) == []
        message: str = failed["error"]["message"]
        return message


async def test_a_download_that_cannot_fit_is_refused_before_it_starts(
    settings: Settings, file_server: FileServer, demo_package: Path
) -> None:
    assert demo_package.stat().st_size > 8 << 20
    with small_disk(settings, "8m") as tight:
        message = await fetch_on(tight, file_server, demo_package)
    assert "free" in message
    assert file_server.gets[demo_package.name] >= 1


async def test_a_disk_that_fills_while_unpacking_is_cleaned_up(
    settings: Settings, file_server: FileServer, demo_package: Path
) -> None:
    """The package fits, but not the package and its unpacked disk together."""
    with small_disk(settings, "20m") as tight:
        message = await fetch_on(tight, file_server, demo_package)
    assert "filled up" in message


async def test_the_reserve_counts_what_running_vms_disks_can_still_grow_into(
    settings: Settings, file_server: FileServer, demo_package: Path
) -> None:
    """A download that fits the free space, but not beside what a running VM's disk can
    still grow into, is refused before it starts."""
    with small_disk(settings, "160m") as tight:
        async with goldclone_server(tight) as goldclone:
            image = {"url": file_server.url(demo_package.name), "checksum": checksum(demo_package)}
            vm = await goldclone.boot({"cpus": 1, "memory": 128, "image": image})
            assert vm["status"] == "running", vm
            growth = disks.growth(goldclone.data_dir / "vms" / vm["id"] / "disk.qcow2")
            assert growth > 32 << 20  # the demo guest's disk is 64 MB, and nearly all free
            size = demo_package.stat().st_size
            free = shutil.disk_usage(goldclone.data_dir).free
            filler = goldclone.data_dir / "filler"  # leaves room for the package, not for both
            await asyncio.to_thread(filler.write_bytes, bytes(free - size - growth // 2))

            sha1 = {**image, "checksum": checksum(demo_package, "sha1"), "checksum_type": "sha1"}
            other = await goldclone.post_vm({"cpus": 1, "memory": 128, "image": sha1})
            failed = await goldclone.wait_for(other["id"], "error")
            assert failed["error"]["code"] == "insufficient-space", failed["error"]
            assert (
                "kept in reserve (for the host, and for what the running VMs"
                in failed["error"]["message"]
            )
            filler.unlink()
