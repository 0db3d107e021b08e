"""The whole API on the vmware driver, against the stand-in vmrun (tests/fake_vmrun.py).

No guest boots here, so instead of fetching a page from the guest, each test checks what the
stand-in recorded and wrote: the linked clone and its parent, the clone's .vmx, which VMs
run and how they were started, and that nothing is left afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from goldclone.drivers.vmware import VMwareDriver
from goldclone.errors import DriverUnavailable
from goldclone.images.vmx import VmxFile, read_vmx
from goldclone.settings import Settings, VMwareConfig
from tests.conftest import checksum, on_fake_vmrun
from tests.fake_vmrun import FakeVmrun
from tests.harness import Goldclone, forget, goldclone_server, leftovers
from tests.packages import VMX, make_package
from tests.servers import FileServer

VMWARE_KINDS = ("vmware", "vmware-tar.bz2", "vmware-tar", "vmware-zip")
HOSTILE_VMX = (
    VMX
    + """\
ide1:0.present = "TRUE"
ide1:0.deviceType = "cdrom-image"
ide1:0.fileName = "/etc/passwd"
scsi0:1.present = "TRUE"
scsi0:1.deviceType = "rawDisk"
scsi0:1.fileName = "/dev/sda"
floppy0.fileName = "/dev/fd0"
serial0.present = "TRUE"
serial0.fileType = "file"
serial0.fileName = "/root/.ssh/authorized_keys"
parallel0.fileName = "/tmp/printer"
sharedFolder0.hostPath = "/"
sharedFolder.maxNum = "1"
nvram = "/etc/shadow"
usb.autoConnect.device0 = "0x0781:0x5567"
ethernet1.present = "TRUE"
ethernet1.connectionType = "bridged"
"""
)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FileServer]:
    """A file server with a small disk packaged every way the vmware driver takes."""
    root = tmp_path_factory.mktemp("vmware-packages")
    disk = root / "tiny.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    for kind in (*VMWARE_KINDS, "qcow2"):
        make_package(disk, kind, root / f"{kind}.pkg")
    make_package(disk, "vmware", root / "hostile.pkg", vmx=HOSTILE_VMX)
    with tarfile.open(root / "two-vmx.pkg", "w:gz") as tar:
        for name in ("one/vm.vmx", "two/vm.vmx"):
            info = tarfile.TarInfo(name)
            info.size = len(VMX)
            tar.addfile(info, io.BytesIO(VMX.encode()))
    with FileServer(root).running() as server:
        yield server


Request = Callable[..., dict[str, Any]]


@pytest.fixture
def request_for(served: FileServer) -> Request:
    """A small create request for the package ``kind``, with ``changes`` applied."""

    def build(
        kind: str = "vmware", checksum_type: str = "sha256", **changes: Any
    ) -> dict[str, Any]:
        package = served.root / f"{kind}.pkg"
        image = {
            "url": served.url(package.name),
            "checksum": checksum(package, checksum_type),
            "checksum_type": checksum_type,
        }
        return {"cpus": 1, "memory": 256, "image": image} | changes

    return build


@pytest.fixture
def vmware_settings(settings: Settings, fake_vmrun: FakeVmrun) -> Settings:
    return on_fake_vmrun(settings, fake_vmrun)


@pytest.fixture
async def goldclone(vmware_settings: Settings) -> AsyncIterator[Goldclone]:
    async with goldclone_server(vmware_settings) as server:
        yield server


def clone_vmx(goldclone: Goldclone, vm: dict[str, Any]) -> Path:
    return goldclone.data_dir / "vms" / vm["id"] / f"{vm['id']}.vmx"


def template_of(clone: Path) -> Path:
    """The template a clone was made from, as its .vmsd records it."""
    parent = read_vmx(clone.with_suffix(".vmsd")).get("cloneOf0")
    assert parent is not None
    return Path(parent)


def vmsd(vmx: Path) -> VmxFile:
    return read_vmx(vmx.with_suffix(".vmsd"))


async def destroy_and_check(goldclone: Goldclone, fake: FakeVmrun, vm: dict[str, Any]) -> None:
    await goldclone.delete(vm["id"])
    assert (await goldclone.client.get(f"/vms/{vm['id']}")).status_code == 404
    assert leftovers(goldclone.data_dir, vm) == []
    assert str(clone_vmx(goldclone, vm)) not in fake.running()


@pytest.mark.parametrize("network_type", ["nat", "hostonly", "bridged"])
async def test_create_get_list_delete(
    goldclone: Goldclone, fake_vmrun: FakeVmrun, request_for: Request, network_type: str
) -> None:
    vm = await goldclone.boot(request_for(network_type=network_type, cpus=2, memory=512))
    assert vm["status"] == "running", vm
    assert [e["phase"] for e in vm["timeline"]] == [
        "accepted", "downloading", "cloning", "booting", "running",
    ]  # fmt: skip
    path = clone_vmx(goldclone, vm)
    running = fake_vmrun.running()[str(path)]
    assert running["mode"] == "nogui"
    assert vm["ip_address"] == running["ip"]

    vmx = read_vmx(path)
    assert (vmx.get("numvcpus"), vmx.get("memsize")) == ("2", "512")
    assert vmx.get("displayName") == f"goldclone-{vm['id']}"
    assert vmx.get("guestinfo.goldclone.id") == vm["id"]
    nic = {key.split(".", 1)[1]: vmx.get(key) for key in vmx if key.startswith("ethernet")}
    assert nic == {
        "present": "TRUE",
        "connectionType": network_type,
        "virtualDev": "e1000",
        "addressType": "static",
        "address": vm["mac_address"],
        "startConnected": "TRUE",
    }
    assert re.fullmatch(r"00:50:56:[0-3][0-9a-f](:[0-9a-f]{2}){2}", vm["mac_address"])

    # a linked clone of the template's snapshot, whose base disk is the gold image's own
    template = template_of(path)
    assert template.parent.parent == goldclone.data_dir / "vmware" / "templates"
    delta = (path.parent / (vmx.get("scsi0:0.fileName") or "")).read_text()
    base = Path(re.findall(r'parentFileNameHint="([^"]+)"', delta)[0])
    gold = goldclone.data_dir / "images" / f"sha256-{vm['image']['checksum']}"
    assert base == gold / "content" / "demo.vmwarevm" / "demo.vmdk"
    assert vmsd(template).get("snapshot0.clone0") == str(path)

    assert (await goldclone.client.get(f"/vms/{vm['id']}")).json() == vm
    listed = (await goldclone.client.get("/vms")).json()["vms"]
    assert [v["id"] for v in listed] == [vm["id"]]

    await destroy_and_check(goldclone, fake_vmrun, vm)
    assert fake_vmrun.running() == {}
    assert vmsd(template).get("snapshot0.numClones") == "0"
    gold_vmx = gold / "content" / "demo.vmwarevm" / "demo.vmx"
    assert gold_vmx.read_text() == VMX, "the gold .vmx stays as it was packaged"
    assert sorted(p.name for p in gold_vmx.parent.iterdir()) == ["demo.vmdk", "demo.vmx"]
    assert gold_vmx.stat().st_mode & 0o222 == 0


async def test_the_guest_is_told_its_configuration_through_guestinfo(
    goldclone: Goldclone, fake_vmrun: FakeVmrun, request_for: Request
) -> None:
    """What cloud-init's VMware datasource and a guest's ``vmware-rpctool`` read, as the
    stand-in hands it to the guest; nothing secret comes back through the API."""
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl ci"
    metadata = {"coordinator": "https://ci.example.org", "job.token": "secret-4f1d"}
    user_data = "#cloud-config\nwrite_files: [{path: /etc/job, content: secret-9a0c}]\n"
    body = request_for(name="builder-3", ssh_authorized_keys=[key], user_data=user_data,
                       metadata=metadata)  # fmt: skip
    vm = await goldclone.boot(body)
    assert vm["status"] == "running", vm
    path = clone_vmx(goldclone, vm)
    told = json.loads(base64.b64decode(fake_vmrun.read_variable(path, "metadata")))
    assert told == {
        "instance-id": vm["id"], "local-hostname": "builder-3", "public-keys": [key],
        "goldclone_metadata": metadata,
    }  # fmt: skip
    assert fake_vmrun.read_variable(path, "metadata.encoding") == "base64"
    assert base64.b64decode(fake_vmrun.read_variable(path, "userdata")).decode() == user_data
    assert fake_vmrun.read_variable(path, "job.token") == "secret-4f1d"
    assert fake_vmrun.read_variable(path, "coordinator") == "https://ci.example.org"
    assert path.stat().st_mode & 0o077 == 0  # the .vmx holds secrets now
    shown = (await goldclone.client.get(f"/vms/{vm['id']}")).text
    assert "secret-4f1d" not in shown and "secret-9a0c" not in shown
    await destroy_and_check(goldclone, fake_vmrun, vm)


@pytest.mark.parametrize(
    ("kind", "checksum_type"),
    [("vmware", "sha1"), ("vmware-tar.bz2", "md5"), ("vmware-tar", "sha256"),
     ("vmware-zip", "sha512")],
)  # fmt: skip
async def test_a_vmware_package_in_every_archive_format(
    goldclone: Goldclone,
    fake_vmrun: FakeVmrun,
    request_for: Request,
    kind: str,
    checksum_type: str,
) -> None:
    vm = await goldclone.boot(request_for(kind, checksum_type))
    assert vm["status"] == "running", vm
    assert str(clone_vmx(goldclone, vm)) in fake_vmrun.running()
    gold = goldclone.data_dir / "images" / f"{checksum_type}-{vm['image']['checksum']}"
    assert (gold / "content" / "demo.vmwarevm" / "demo.vmx").is_file()
    await destroy_and_check(goldclone, fake_vmrun, vm)
    assert gold.is_dir(), "the gold image stays for the next VM"


async def test_concurrent_creates_make_one_snapshot_and_n_clones(
    goldclone: Goldclone, fake_vmrun: FakeVmrun, request_for: Request
) -> None:
    accepted = await asyncio.gather(*(goldclone.post_vm(request_for()) for _ in range(4)))
    vms = [await goldclone.wait_for(vm["id"], "running", "error") for vm in accepted]
    assert [vm["status"] for vm in vms] == ["running"] * 4, vms

    assert len(fake_vmrun.calls("snapshot")) == 1
    clones = fake_vmrun.calls("clone")
    assert len(clones) == 4
    assert all(call[3:5] == ["linked", "-snapshot=goldclone"] for call in clones)
    template = template_of(clone_vmx(goldclone, vms[0]))
    assert vmsd(template).get("snapshot.numSnapshots") == "1"
    assert vmsd(template).get("snapshot0.numClones") == "4"
    assert len({vm["mac_address"] for vm in vms}) == 4
    assert len({vm["ip_address"] for vm in vms}) == 4

    for vm in vms:
        await destroy_and_check(goldclone, fake_vmrun, vm)
    assert vmsd(template).get("snapshot0.numClones") == "0"


async def test_a_lock_on_delete_is_409_and_nothing_is_lost(
    goldclone: Goldclone, fake_vmrun: FakeVmrun, request_for: Request
) -> None:
    vm = await goldclone.boot(request_for())
    path = clone_vmx(goldclone, vm)
    fake_vmrun.control(locked=[str(path)])

    response = await goldclone.client.delete(f"/vms/{vm['id']}")
    assert response.status_code == 409, response.text
    assert response.json()["code"] == "vm-conflict"
    assert "in use" in response.json()["message"]
    assert str(goldclone.data_dir) not in response.text
    assert (await goldclone.client.get(f"/vms/{vm['id']}")).json() == vm
    assert [v["id"] for v in (await goldclone.client.get("/vms")).json()["vms"]] == [vm["id"]]
    assert str(path) in fake_vmrun.running() and path.is_file()

    fake_vmrun.control(locked=[])
    await destroy_and_check(goldclone, fake_vmrun, vm)


async def test_a_slow_guest_ip_within_the_timeout(
    goldclone: Goldclone, fake_vmrun: FakeVmrun, request_for: Request
) -> None:
    fake_vmrun.control(ip_delay=1.5)
    vm = await goldclone.boot(request_for())
    assert vm["status"] == "running", vm
    assert vm["ip_address"] == fake_vmrun.running()[str(clone_vmx(goldclone, vm))]["ip"]
    assert all("-wait" in call for call in fake_vmrun.calls("getGuestIPAddress"))
    await destroy_and_check(goldclone, fake_vmrun, vm)


async def test_a_guest_without_ip_times_out_and_leaves_nothing(
    vmware_settings: Settings, fake_vmrun: FakeVmrun, request_for: Request
) -> None:
    fake_vmrun.control(guest_ip=False)
    async with goldclone_server(dataclasses.replace(vmware_settings, ip_timeout=2.0)) as goldclone:
        vm = await goldclone.boot(request_for())
        assert vm["status"] == "error"
        assert vm["error"]["code"] == "ip-timeout"
        assert leftovers(goldclone.data_dir, vm) == []
        assert fake_vmrun.running() == {}


async def test_the_ip_from_vmnet_dhcpd_leases(
    goldclone: Goldclone, fake_vmrun: FakeVmrun, request_for: Request
) -> None:
    fake_vmrun.control(tools=False, lease_file=str(fake_vmrun.lease_file))
    vm = await goldclone.boot(request_for())
    assert vm["status"] == "running", vm
    assert vm["ip_address"] == fake_vmrun.running()[str(clone_vmx(goldclone, vm))]["ip"]
    assert vm["mac_address"] in fake_vmrun.lease_file.read_text()
    await destroy_and_check(goldclone, fake_vmrun, vm)


async def test_not_headless_starts_with_a_window(
    goldclone: Goldclone, fake_vmrun: FakeVmrun, request_for: Request
) -> None:
    vm = await goldclone.boot(request_for(headless=False))
    path = clone_vmx(goldclone, vm)
    assert fake_vmrun.calls("start") == [["start", str(path), "gui"]]
    assert fake_vmrun.running()[str(path)]["mode"] == "gui"
    await destroy_and_check(goldclone, fake_vmrun, vm)


async def test_a_refused_headless_start_falls_back_to_a_window(
    goldclone: Goldclone, fake_vmrun: FakeVmrun, request_for: Request
) -> None:
    fake_vmrun.control(nogui_error="The operation was canceled")
    vm = await goldclone.boot(request_for())
    assert vm["status"] == "running", vm
    path = str(clone_vmx(goldclone, vm))
    assert fake_vmrun.calls("start") == [["start", path, "nogui"], ["start", path, "gui"]]
    await destroy_and_check(goldclone, fake_vmrun, vm)


async def test_without_the_fallback_a_refused_headless_start_fails(
    settings: Settings, fake_vmrun: FakeVmrun, request_for: Request
) -> None:
    fake_vmrun.control(nogui_error="The operation was canceled")
    async with goldclone_server(on_fake_vmrun(settings, fake_vmrun, gui_fallback=False)) as gc:
        vm = await gc.boot(request_for())
        assert vm["status"] == "error"
        assert vm["error"]["code"] == "boot-failed"
        assert "The operation was canceled" in vm["error"]["message"]
        assert leftovers(gc.data_dir, vm) == []


async def test_a_clone_names_no_host_file(
    goldclone: Goldclone, fake_vmrun: FakeVmrun, request_for: Request
) -> None:
    vm = await goldclone.boot(request_for("hostile"))
    assert vm["status"] == "running", vm
    vmx = read_vmx(clone_vmx(goldclone, vm))
    paths = {key: vmx.get(key) for key in vmx if "/" in (vmx.get(key) or "")}
    assert paths == {}
    for device in ("ide1:0", "scsi0:1", "floppy0", "serial0", "parallel0"):
        assert vmx.get(f"{device}.present") == "FALSE", device
    assert not [key for key in vmx if key.lower().startswith(("sharedfolder", "usb.auto"))]
    assert not [key for key in vmx if key.lower().startswith("ethernet1")]
    assert vmx.get("scsi0:0.present") == "TRUE"
    opened = fake_vmrun.opened()
    assert opened, "VMware opened the disks at least"
    assert [path for path in opened if not path.is_relative_to(goldclone.data_dir.absolute())] == []
    await destroy_and_check(goldclone, fake_vmrun, vm)


@pytest.mark.parametrize(
    ("kind", "mentions"),
    [("qcow2", "needs a VMware VM package"), ("two-vmx", "several .vmx files")],
)
async def test_a_package_without_one_vmx_is_unsupported(
    goldclone: Goldclone, request_for: Request, kind: str, mentions: str
) -> None:
    vm = await goldclone.boot(request_for(kind))
    assert vm["status"] == "error"
    assert vm["error"]["code"] == "image-unsupported"
    assert mentions in vm["error"]["message"]
    assert leftovers(goldclone.data_dir, vm) == []


async def test_a_guest_that_powers_off_is_stopped(
    goldclone: Goldclone, fake_vmrun: FakeVmrun, request_for: Request
) -> None:
    vm = await goldclone.boot(request_for())
    fake_vmrun.power_off(clone_vmx(goldclone, vm))
    stopped = await goldclone.wait_for(vm["id"], "stopped", timeout=10)
    assert stopped["timeline"][-1]["phase"] == "stopped"
    await destroy_and_check(goldclone, fake_vmrun, stopped)
    assert fake_vmrun.calls("stop") == []


async def test_a_vm_is_not_called_stopped_when_vmrun_cannot_list(
    goldclone: Goldclone, fake_vmrun: FakeVmrun, request_for: Request
) -> None:
    vm = await goldclone.boot(request_for())
    fake_vmrun.control(list_error="Unable to connect to host.")
    asked = len(fake_vmrun.calls("list"))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    # GETs until one of them has made the driver ask vmrun (past its listing's cache)
    while len(fake_vmrun.calls("list")) == asked:
        assert (await goldclone.client.get(f"/vms/{vm['id']}")).json()["status"] == "running"
        assert loop.time() < deadline, "the driver never listed the VMs again"
        await asyncio.sleep(0.05)
    assert (await goldclone.client.get(f"/vms/{vm['id']}")).json()["status"] == "running"
    fake_vmrun.control(list_error=None)
    await destroy_and_check(goldclone, fake_vmrun, vm)


async def test_a_guest_that_ignores_soft_stop_is_stopped_hard(
    vmware_settings: Settings, fake_vmrun: FakeVmrun, request_for: Request
) -> None:
    async with goldclone_server(
        dataclasses.replace(vmware_settings, shutdown_timeout=1.0)
    ) as goldclone:
        vm = await goldclone.boot(request_for())
        fake_vmrun.control(soft_stop_hangs=True)
        await destroy_and_check(goldclone, fake_vmrun, vm)
        path = str(clone_vmx(goldclone, vm))
        assert fake_vmrun.calls("stop") == [["stop", path, "soft"], ["stop", path, "hard"]]


async def test_running_vms_survive_a_restart_and_the_snapshot_is_reused(
    goldclone: Goldclone, fake_vmrun: FakeVmrun, request_for: Request
) -> None:
    vm = await goldclone.boot(request_for())
    await goldclone.stop()
    await goldclone.start()
    assert (await goldclone.client.get(f"/vms/{vm['id']}")).json() == vm
    other = await goldclone.boot(request_for())
    assert other["status"] == "running", other
    assert len(fake_vmrun.calls("snapshot")) == 1
    assert fake_vmrun.calls("listSnapshots"), "the restarted service checks the template once"
    for v in (vm, other):
        await destroy_and_check(goldclone, fake_vmrun, v)


async def test_a_clone_the_store_does_not_know_is_removed_at_start(
    goldclone: Goldclone, fake_vmrun: FakeVmrun, request_for: Request
) -> None:
    vm = await goldclone.boot(request_for())
    await goldclone.stop()
    forget(goldclone.data_dir, vm["id"])
    await goldclone.start()
    clone = clone_vmx(goldclone, vm)
    deadline = asyncio.get_running_loop().time() + 30
    while clone.parent.exists():
        assert asyncio.get_running_loop().time() < deadline, "the orphan clone stays"
        await asyncio.sleep(0.05)
    assert str(clone) not in fake_vmrun.running()
    assert (await goldclone.client.get(f"/vms/{vm['id']}")).status_code == 404


@pytest.mark.root
async def test_the_smoke_script_passes_against_the_stand_in(
    goldclone: Goldclone, fake_vmrun: FakeVmrun, request_for: Request
) -> None:
    image = request_for()["image"]
    smoke = Path(__file__).parent.parent / "scripts" / "vmware-smoke"
    result = await asyncio.to_thread(
        subprocess.run,
        [str(smoke), "--url", str(goldclone.client.base_url), "--image-url", image["url"],
         "--checksum", image["checksum"], "--data-dir", str(goldclone.data_dir),
         "--vmrun", str(fake_vmrun.path), "--timeout", "30"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout and "all steps passed" in result.stdout
    assert "ok   vmrun list no more" in result.stdout


# -- finding vmrun ---------------------------------------------------------------------------


async def test_a_configured_vmrun_that_is_missing_fails_at_start_up(tmp_path: Path) -> None:
    driver = VMwareDriver(tmp_path, VMwareConfig(vmrun=str(tmp_path / "nowhere" / "vmrun")))
    with pytest.raises(DriverUnavailable, match=r"GOLDCLONE_VMRUN=.* is not an executable vmrun"):
        await driver.prepare()


async def test_no_vmrun_anywhere_fails_at_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DriverUnavailable, match=r"needs VMware's vmrun.*GOLDCLONE_VMRUN"):
        await VMwareDriver(tmp_path, VMwareConfig()).prepare()


async def test_a_vmrun_that_does_not_work_fails_at_start_up(tmp_path: Path) -> None:
    broken = tmp_path / "vmrun"
    broken.write_text("#!/bin/sh\necho 'Error: Unable to connect to host.'\nexit 255\n")
    broken.chmod(0o755)
    with pytest.raises(DriverUnavailable, match=r"list does not work: .*Unable to connect"):
        await VMwareDriver(tmp_path, VMwareConfig(vmrun=str(broken))).prepare()


async def test_vmrun_is_found_on_path(
    tmp_path: Path, fake_vmrun: FakeVmrun, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", f"{fake_vmrun.path.parent}{os.pathsep}{os.environ['PATH']}")
    driver = VMwareDriver(tmp_path, VMwareConfig())
    await driver.prepare()
    assert (driver.cli.path, driver.cli.host_type) == (str(fake_vmrun.path), "ws")
    assert fake_vmrun.calls() == [["list"]]


def test_the_server_refuses_to_start_without_vmrun(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = os.environ | {"GOLDCLONE_DRIVER": "vmware", "GOLDCLONE_VMRUN": "/nowhere/vmrun"}
    result = subprocess.run(
        [sys.executable, "-m", "goldclone.cli", "serve", "--data-dir", str(tmp_path),
         "--port", str(port)],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "GOLDCLONE_VMRUN='/nowhere/vmrun' is not an executable vmrun" in result.stderr
