"""The client: the ``goldclone`` CLI run as a real program, and the Python client, against a
real server on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from goldclone.client import APIError, AsyncClient, Client, ServerUnreachable, VMFailed
from goldclone.image_spec import ImageSpec
from goldclone.models import CreateVMRequest
from tests.conftest import checksum, ssh_key
from tests.harness import Goldclone, leftovers
from tests.servers import FileServer
from tests.serving import GOLDCLONE, in_pty

pytestmark = pytest.mark.root


async def cli(goldclone: Goldclone, *args: str) -> tuple[int, str, str]:
    """Run ``goldclone ARGS`` against the test server; return (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *GOLDCLONE, *args, env={**os.environ, "GOLDCLONE_URL": str(goldclone.client.base_url)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
def demo(file_server: FileServer, demo_package: Path) -> tuple[str, str]:
    return file_server.url(demo_package.name), checksum(demo_package)


async def test_create_wait_get_list_delete(goldclone: Goldclone, demo: tuple[str, str]) -> None:
    url, digest = demo
    code, out, err = await cli(goldclone, "create", url, "--checksum", digest, "--cpus", "1",
                               "--memory", "256")  # fmt: skip
    assert code == 0, err
    vm_id = out.strip()
    code, out, err = await cli(goldclone, "wait", vm_id, "--json")
    assert code == 0, err
    vm = json.loads(out)
    assert vm["id"] == vm_id and vm["status"] == "running" and vm["ip_address"]

    code, out, _ = await cli(goldclone, "get", vm["id"], "--json")
    assert code == 0 and json.loads(out)["id"] == vm["id"]
    code, out, _ = await cli(goldclone, "list", "--json")
    assert code == 0 and [v["id"] for v in json.loads(out)["vms"]] == [vm["id"]]
    code, out, _ = await cli(goldclone, "list")
    assert code == 0 and vm["id"] in out and vm["ip_address"] in out
    code, out, err = await cli(goldclone, "ssh", vm["id"])  # the demo guest has no sshd
    assert (code, err.splitlines()) == (1, [
        f"goldclone ssh: no-ssh-server: the guest at {vm['ip_address']} refuses connections on "
        "port 22: it runs no SSH server (the demo guest has none; a cloud image's starts as it "
        "boots)"
    ])  # fmt: skip

    code, out, _ = await cli(goldclone, "delete", vm["id"])
    assert code == 0 and vm["id"] in out
    assert leftovers(goldclone.data_dir, vm) == []
    code, _, err = await cli(goldclone, "get", vm["id"])
    assert code == 1 and "vm-not-found" in err


async def test_create_from_the_original_projects_request_file(
    goldclone: Goldclone, file_server: FileServer, demo_package: Path, tmp_path: Path
) -> None:
    """The OS X Builder README's request file, with only the image changed, taken as it is."""
    request = {
        "cpus": 2,
        "memory": 1024,
        "network_type": "nat",
        "image": {
            "url": file_server.url(demo_package.name),
            "checksum": checksum(demo_package, "sha1"),
            "checksum_type": "sha1",
        },
        "headless": True,
    }
    body = tmp_path / "create.json"
    body.write_text(json.dumps(request))
    code, out, err = await cli(goldclone, "create", "--from", str(body), "--wait", "--json")
    assert code == 0, err
    vm = json.loads(out)
    assert (vm["cpus"], vm["memory"], vm["image"]["checksum_type"]) == (2, 1024, "sha1")
    assert vm["status"] == "running"
    await goldclone.delete(vm["id"])


async def test_exit_codes(goldclone: Goldclone, demo: tuple[str, str]) -> None:
    url, digest = demo
    code, _, err = await cli(goldclone, "create", url, "--checksum", "0" * 64, "--wait")
    assert code == 1 and "checksum-mismatch" in err

    code, _, err = await cli(goldclone, "create")
    assert code == 2 and "--checksum" in err
    code, _, err = await cli(goldclone, "create", url, "--checksum", "zz")
    assert code == 2 and "hexadecimal" in err
    code, _, err = await cli(goldclone, "create", url, "--checksum", digest, "--cpus", "999")
    assert code == 2 and "cpus" in err
    code, _, _ = await cli(goldclone, "list", "--bogus-option")
    assert code == 2

    code, _, err = await cli(goldclone, "list", "--url", "http://127.0.0.1:9")
    assert code == 3 and "cannot reach" in err


async def test_images_pull_list_and_delete_only_when_unused(
    goldclone: Goldclone, demo: tuple[str, str]
) -> None:
    url, digest = demo
    image_id = f"sha256-{digest}"
    code, out, err = await cli(goldclone, "images", "pull", url, "--checksum", digest, "--json")
    assert code == 0, err
    assert json.loads(out)["id"] == image_id
    ready = await wait_for_image(goldclone, image_id, "ready")
    assert ready["url"] == url and ready["size_bytes"] > 1_000_000 and ready["vms"] == 0

    vm = await goldclone.boot({"cpus": 1, "memory": 256, "image": {"url": url, "checksum": digest}})
    assert "downloading" not in [entry["phase"] for entry in vm["timeline"]], "pulled ahead"
    assert (await wait_for_image(goldclone, image_id, "ready"))["vms"] == 1
    code, _, err = await cli(goldclone, "images", "delete", image_id)
    assert code == 1 and "image-in-use" in err
    assert (goldclone.data_dir / "images" / image_id).is_dir()

    await goldclone.delete(vm["id"])
    code, out, _ = await cli(goldclone, "images")
    assert code == 0 and image_id in out
    code, _, err = await cli(goldclone, "images", "delete", image_id)
    assert code == 0, err
    assert not (goldclone.data_dir / "images" / image_id).exists()
    code, out, _ = await cli(goldclone, "images", "list", "--json")
    assert json.loads(out) == {"images": []}
    code, _, err = await cli(goldclone, "images", "delete", image_id)
    assert code == 1 and "image-not-found" in err


async def wait_for_image(goldclone: Goldclone, image_id: str, status: str) -> dict[str, Any]:
    for _ in range(600):
        images = (await goldclone.client.get("/images")).json()["images"]
        found = [image for image in images if image["id"] == image_id]
        if found and found[0]["status"] == status:
            image: dict[str, Any] = found[0]
            return image
        await asyncio.sleep(0.05)
    raise AssertionError(f"image {image_id} never became {status}")


async def test_a_download_shows_its_progress(
    goldclone: Goldclone, file_server: FileServer, demo_package: Path
) -> None:
    """The stall server sends the headers and then nothing, so the download stays at 0."""
    url = file_server.url(f"stall/{demo_package.name}")
    vm = await goldclone.post_vm({"image": {"url": url, "checksum": checksum(demo_package)}})
    await goldclone.wait_for_phase(vm["id"], "downloading")
    size = demo_package.stat().st_size
    progress = {"bytes_done": 0, "bytes_total": size}
    for _ in range(100):
        seen = (await goldclone.client.get(f"/vms/{vm['id']}")).json()["progress"]
        if seen is not None:
            break
        await asyncio.sleep(0.05)
    assert seen == progress
    [image] = (await goldclone.client.get("/images")).json()["images"]
    assert image["status"] == "downloading" and image["progress"] == progress
    await goldclone.delete(vm["id"])


async def test_create_wait_shows_progress_in_a_terminal(
    goldclone: Goldclone, file_server: FileServer, demo_package: Path
) -> None:
    url, digest = file_server.url(f"slow/{demo_package.name}"), checksum(demo_package)
    argv = [*GOLDCLONE, "create", url, "--checksum", digest, "--cpus", "1", "--memory", "256",
            "--wait"]  # fmt: skip
    env = {**os.environ, "GOLDCLONE_URL": str(goldclone.client.base_url), "COLUMNS": "100"}
    screen, code = await asyncio.to_thread(in_pty, argv, env)
    assert code == 0, screen
    assert "\x1b[" in screen, "a terminal gets a live display"
    transcript = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)
    total = f"{demo_package.stat().st_size / 1e6:.1f} MB"
    bars = re.findall(rf"(\d+\.\d)/{re.escape(total)} ", transcript)
    assert len(bars) >= 2 and float(bars[0]) < float(bars[-1]), "a bar that advances"
    phases = ["accepted", "downloading", "cloning", "booting", "running"]
    positions = [transcript.find(f"✓ {phase}") for phase in phases]
    assert -1 not in positions and positions == sorted(positions), transcript
    vm = (await goldclone.client.get("/vms")).json()["vms"][0]
    assert transcript.rstrip().splitlines()[-1].strip() == vm["ip_address"]
    await goldclone.delete(vm["id"])


async def test_python_clients(goldclone: Goldclone, demo: tuple[str, str]) -> None:
    url, digest = demo
    request = CreateVMRequest(image=ImageSpec(url=url, checksum=digest), cpus=1, memory=256)
    async with AsyncClient(str(goldclone.client.base_url)) as client:
        vm = await client.create(request)
        seen: list[str] = []
        running = await client.wait_until_running(vm.id, on_update=lambda v: seen.append(v.status))
        assert running.ip_address and seen[-1] == "running"
        assert [v.id for v in await client.list_vms()] == [vm.id]
        await client.delete(vm.id)
        with pytest.raises(APIError) as caught:
            await client.get(vm.id)
        assert (caught.value.status, caught.value.code) == (404, "vm-not-found")

        bad = CreateVMRequest(image=ImageSpec(url=url, checksum="0" * 64), cpus=1, memory=256)
        failed = await client.create(bad)
        with pytest.raises(VMFailed) as ended:
            await client.wait_until_running(failed.id)
        assert ended.value.code == "checksum-mismatch"
        await client.delete(failed.id)

    def blocking() -> None:
        with Client(str(goldclone.client.base_url)) as client:
            assert client.list_vms() == []
            with pytest.raises(APIError, match="invalid-request"):
                client.create(request.model_copy(update={"cpus": 999}))
        with Client("http://127.0.0.1:9") as client, pytest.raises(ServerUnreachable):
            client.list_vms()

    await asyncio.to_thread(blocking)


async def test_create_tells_the_guest_its_name_keys_script_and_metadata(
    goldclone: Goldclone, demo: tuple[str, str], tmp_path: Path
) -> None:
    url, digest = demo
    key, public = ssh_key(tmp_path, "cli@test")
    script = tmp_path / "user-data.sh"
    script.write_text("#!/bin/sh\necho from-the-cli > /www/cli.txt\n")
    code, out, err = await cli(
        goldclone, "create", url, "--checksum", digest, "--cpus", "1", "--memory", "256",
        "--name", "cli-vm", "--ssh-key", f"{key}.pub", "--user-data", str(script),
        "--metadata", "job.id=42", "--metadata", "url=http://x/?a=b", "--ready-when",
        '{"tcp": 80}', "--wait", "--json",
    )  # fmt: skip
    assert code == 0, err
    vm = json.loads(out)
    assert (vm["name"], vm["hostname"], vm["metadata_keys"]) == (
        "cli-vm",
        "cli-vm",
        ["job.id", "url"],
    )
    assert vm["ssh_authorized_keys"] == [public]
    assert [e["phase"] for e in vm["timeline"]][-2:] == ["ready", "running"]
    async with AsyncClient(str(goldclone.client.base_url)) as client:
        await client.delete(vm["id"])
    code, _, err = await cli(
        goldclone, "create", url, "--checksum", digest, "--metadata", "novalue"
    )
    assert code == 2 and "--metadata novalue: expected KEY=VALUE" in err
    code, _, err = await cli(goldclone, "create", url, "--checksum", digest, "--ssh-key", "/none")
    assert code == 2 and "cannot read /none" in err and "Traceback" not in err
