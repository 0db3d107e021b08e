"""Exec in real QEMU guests of the demo image: through its helper's own virtio-serial port, in
a cold-booted VM, in one restored from a memory template, and in one restored from a template
made before the port existed (tests/fast/test_exec.py covers the rest on the synthetic
driver; tests/test_debian_guest.py the Debian guest)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import tarfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from goldclone.client import APIError, AsyncClient
from goldclone.drivers.qemu import hardware
from goldclone.exec_protocol import ExecRequest, TerminalSize
from tests.harness import Goldclone, cli, make_folder, port_forward, read_until, tree

pytestmark = pytest.mark.root


def client_of(goldclone: Goldclone) -> AsyncClient:
    return AsyncClient(str(goldclone.client.base_url))


async def test_exec_in_a_cold_booted_demo_guest(
    goldclone: Goldclone, demo_body: dict[str, Any]
) -> None:
    vm = await goldclone.boot(demo_body)
    async with client_of(goldclone) as client:
        script = "echo out; echo err >&2; read line; echo got $line; exit 3"
        done = await client.exec(vm["id"], ExecRequest(script=script), b"hi\n")
        assert (done.stdout, done.stderr, done.result.exit_code) == (b"out\ngot hi\n", b"err\n", 3)

        size = 50 * 1000 * 1000
        made = ExecRequest(script=f"head -c {size} /dev/urandom > /tmp/blob; sha256sum /tmp/blob")
        digest = (await client.exec(vm["id"], made)).stdout.split()[0].decode()
        blob = await client.exec(vm["id"], ExecRequest(argv=["cat", "/tmp/blob"]))
        assert len(blob.stdout) == size and hashlib.sha256(blob.stdout).hexdigest() == digest

        killed = await client.exec(vm["id"], ExecRequest(script="echo on; sleep 600", timeout=1))
        assert killed.stdout == b"on\n"
        assert (killed.result.timed_out, killed.result.exit_code) == (True, 137)

        tty = ExecRequest(script="stty size; read x; stty size", tty=TerminalSize(rows=33, cols=99))
        session = await client.exec_session(vm["id"], tty)
        output = session.output()
        assert await read_until(output, b"33 99\r\n") == b"33 99\r\n"
        await session.resize(40, 120)
        await session.write(b"\n")
        assert b"".join([data async for _, data in output]).endswith(b"40 120\r\n")
    async with port_forward(goldclone, vm["id"], 80) as local, httpx.AsyncClient() as http:
        page = (await http.get(f"http://127.0.0.1:{local}/", timeout=30)).text
        assert vm["mac_address"] in page  # the guest's own web page, through the API
    await goldclone.delete(vm["id"])


async def make_template(goldclone: Goldclone, demo_body: dict[str, Any]) -> str:
    image_id = f"sha256-{demo_body['image']['checksum']}"
    shape = {"cpus": demo_body["cpus"], "memory": demo_body["memory"]}
    response = await goldclone.client.post(f"/images/{image_id}/templates", json=shape)
    assert response.status_code == 202, response.text
    template_id = str(response.json()["id"])
    async with asyncio.timeout(180):
        while True:
            found = await goldclone.client.get(f"/images/{image_id}/templates")
            [template] = [t for t in found.json()["templates"] if t["id"] == template_id]
            if template["status"] != "creating":
                break
            await asyncio.sleep(0.2)
    assert template["status"] == "ready", template
    return template_id


async def test_exec_in_guests_restored_from_templates_old_and_new(
    goldclone: Goldclone, demo_body: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    await goldclone.client.post("/images", json=demo_body["image"])
    image_id = f"sha256-{demo_body['image']['checksum']}"
    async with asyncio.timeout(60):
        while (await goldclone.client.get(f"/images/{image_id}")).json()["status"] != "ready":
            await asyncio.sleep(0.1)
    # a template as an earlier release made it: no helper port, and no record of its hardware
    with monkeypatch.context() as earlier:
        earlier.setattr(hardware, "CURRENT", hardware.UNRECORDED)
        old = await make_template(goldclone, demo_body)
    recorded = goldclone.data_dir / "templates" / image_id / old / "hardware.json"
    recorded.unlink()
    vm = await goldclone.boot(demo_body)
    assert vm["started_from"] == "template", vm
    async with client_of(goldclone) as client:
        with pytest.raises(APIError) as unavailable:
            await client.exec(vm["id"], ExecRequest(argv=["true"]))
        assert unavailable.value.code == "exec-unavailable"
        assert "template made before" in unavailable.value.message
        await goldclone.delete(vm["id"])
        assert (await goldclone.client.delete(f"/images/{image_id}/templates/{old}")).is_success

        await make_template(goldclone, demo_body)
        vms = [await goldclone.boot(demo_body) for _ in range(2)]
        for vm in vms:
            assert vm["started_from"] == "template", vm
            done = await client.exec(vm["id"], ExecRequest(argv=["hostname"]))
            assert done.stdout.decode().strip() == vm["hostname"], done
            await goldclone.delete(vm["id"])


async def test_cp_to_and_from_a_demo_guest_and_from_one_whose_tar_lies(
    goldclone: Goldclone, demo_body: dict[str, Any], tmp_path: Path
) -> None:
    """Through the guest's own (busybox) tar, modes kept; then CI code in the guest replaces
    its tar to send what would write outside the folder asked for, and is refused."""
    vm = (await goldclone.boot(demo_body))["id"]
    here = make_folder(tmp_path / "here")
    assert (await cli(goldclone, "cp", str(here), f"{vm}:/root/")).returncode == 0
    back = tmp_path / "back"
    back.mkdir()
    down = await cli(goldclone, "cp", f"{vm}:/root/job", str(back))
    assert down.returncode == 0, down.stderr
    assert tree(back / "job") == tree(here)

    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as tar:
        member = tarfile.TarInfo("job/../../escaped")
        member.size = 4
        tar.addfile(member, io.BytesIO(b"evil"))
    liar = ("cat > /evil.tar; mkdir -p /usr/local/bin; "
            "printf '#!/bin/sh\\nexec cat /evil.tar\\n' > /usr/local/bin/tar; "
            "chmod 755 /usr/local/bin/tar")  # fmt: skip
    async with client_of(goldclone) as client:
        assert (
            await client.exec(vm, ExecRequest(script=liar), evil.getvalue())
        ).result.exit_code == 0
    target = tmp_path / "inside"
    target.mkdir()
    refused = await cli(goldclone, "cp", f"{vm}:/root/job", str(target))
    assert refused.returncode == 1 and b"unsafe-archive" in refused.stderr, refused.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "here", "inside"]
    assert list(target.iterdir()) == []
    await goldclone.delete(vm)
