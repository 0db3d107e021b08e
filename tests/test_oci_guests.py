"""Registry images with a real QEMU guest (the demo image): a VM's disk, with what the guest
wrote to it, made into an image, pushed to a real registry (tests/registry.py), forgotten
here, pulled back by its tag and booted; and a containerDisk of the demo disk, booted."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import tarfile
from pathlib import Path
from typing import Any

import pytest

from goldclone.client import AsyncClient
from goldclone.exec_protocol import ExecRequest
from goldclone.settings import Settings
from tests.harness import goldclone_server
from tests.registry import client, push_image, running_registry

pytestmark = pytest.mark.root

MARK = b"written by the first guest\n"
# the disk's last 4 KiB, past the demo disk's one FAT partition
LAST = "$(( $(cat /sys/block/vda/size) - 8 ))"
WRITE = f"printf '{MARK.decode()}' | dd of=/dev/vda bs=512 seek={LAST} conv=notrunc && sync"
READ = f"dd if=/dev/vda bs=512 skip={LAST} count=1 2>/dev/null | head -1"


async def test_a_guests_disk_made_into_an_image_is_pushed_pulled_back_and_boots(
    settings: Settings, demo_body: dict[str, Any], tmp_path: Path
) -> None:
    with running_registry(tmp_path) as registry:
        on = dataclasses.replace(settings, registry_insecure=(registry.host,))
        reference = f"{registry.host}/ci/demo:built"
        async with goldclone_server(on) as goldclone:
            api = AsyncClient(str(goldclone.client.base_url))
            vm = await goldclone.boot(demo_body)
            wrote = await api.exec(vm["id"], ExecRequest(script=WRITE))
            assert wrote.result.exit_code == 0, wrote.stderr
            build = {"name": "demo, marked", "push": reference}
            made = await goldclone.client.post(f"/vms/{vm['id']}/image", json=build, timeout=300)
            assert made.status_code == 201, made.text
            image = made.json()
            stopped = (await goldclone.client.get(f"/vms/{vm['id']}")).json()
            assert stopped["status"] == "stopped"
            await goldclone.delete(vm["id"])
            assert (await goldclone.client.delete(f"/images/{image['id']}")).status_code == 204
            pulled = await goldclone.boot({**demo_body, "image": {"oci": reference}})
            assert pulled["status"] == "running" and pulled["image_from_cache"] is False
            assert pulled["image"]["oci"] == image["oci"]
            read = await api.exec(pulled["id"], ExecRequest(script=READ))
            assert read.stdout == MARK, read.stdout
            await goldclone.delete(pulled["id"])
            await api.aclose()
        gets = registry.blob_gets()
        assert gets and all(served.status == 200 for served in gets)


async def test_a_container_disk_of_the_demo_image_boots(
    settings: Settings, demo_body: dict[str, Any], demo_package: Path, tmp_path: Path
) -> None:
    with tarfile.open(demo_package) as package:  # the demo package: a tar of its one disk
        (member,) = [m for m in package.getmembers() if m.isfile()]
        disk = package.extractfile(member).read()  # type: ignore[union-attr]
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        entry = tarfile.TarInfo("disk/demo.qcow2")
        entry.size = len(disk)
        tar.addfile(entry, io.BytesIO(disk))
    with running_registry(tmp_path) as registry:
        with client(registry) as http:
            push_image(http, "kubevirt/demo", "v1", [gzip.compress(layer.getvalue(), mtime=0)],
                       layer_type="application/vnd.oci.image.layer.v1.tar+gzip")  # fmt: skip
        on = dataclasses.replace(settings, registry_insecure=(registry.host,))
        async with goldclone_server(on) as goldclone:
            image = {"oci": f"{registry.host}/kubevirt/demo:v1"}
            vm = await goldclone.boot({**demo_body, "image": image})
            assert vm["status"] == "running" and vm["ip_address"]
            (gold,) = (await goldclone.client.get("/images")).json()["images"]
            assert gold["disk_sha256"] == hashlib.sha256(disk).hexdigest()
