"""``goldclone doctor``'s checks, on this host (which has what the suite needs) and on hosts
that lack parts of it: another user, missing programs, filesystems and disks that will not do.
They run as root in the suite's private mount namespace, so their mounts never reach the host."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from goldclone.doctor import (
    NEEDED_CAPABILITIES,
    Finding,
    Verdict,
    capabilities,
    check_host,
    mount_of,
    render_findings,
)
from goldclone.drivers.qemu.accel import kvm_works
from goldclone.settings import Settings, VMwareConfig

pytestmark = pytest.mark.root


@pytest.fixture
def short_dir(workdir: Path) -> Path:
    """A folder of this test's, short enough for a data dir (pytest's tmp_path is too long)."""
    return Path(tempfile.mkdtemp(prefix="doctor", dir=workdir))


PROGRAMS = ("qemu", "qemu-img", "dnsmasq", "dhcp_release", "nftables", "iproute2", "nice", "chrt")


async def _findings(**settings: Any) -> dict[str, Finding]:
    return {finding.name: finding for finding in await check_host(Settings(**settings))}


@contextmanager
def _mounted(folder: Path, *options: str) -> Iterator[Path]:
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", *options, "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


async def test_this_host_has_every_program_and_privilege_the_qemu_driver_needs(
    short_dir: Path,
) -> None:
    found = await _findings(data_dir=short_dir / "data")
    for name in (*PROGRAMS, "privileges", "cgroups", "walls"):
        assert found[name].verdict is Verdict.OK, found[name]
    assert found["cgroups"].found.startswith("cgroup v1: ")  # what this project's machines have
    # a warning at most: the suite's folder may be on tmpfs, or its disk fuller than 1 GB
    assert found["data dir"].verdict is not Verdict.PROBLEM, found["data dir"]
    assert found["free space"].verdict is not Verdict.PROBLEM, found["free space"]
    assert found["qemu"].found.startswith("QEMU emulator version ")
    assert found["qemu-img"].found.startswith("qemu-img version ")
    assert "nftables v" in found["nftables"].found
    assert "to be made; " in found["data dir"].found  # the data dir does not exist yet
    assert not (short_dir / "data").exists() and list(short_dir.iterdir()) == []
    lines, status = render_findings(list(found.values()))
    assert status == 0 and (lines[-1] == "all fine" or lines[-1].startswith("0 problems, "))


async def test_kvm_is_reported_as_the_drivers_own_probe_finds_it(short_dir: Path) -> None:
    works = await kvm_works("qemu-system-x86_64")
    auto = (await _findings(data_dir=short_dir))["kvm"]
    forced = (await _findings(data_dir=short_dir, accel="kvm"))["kvm"]
    tcg = (await _findings(data_dir=short_dir, accel="tcg"))["kvm"]
    if works:
        assert (auto.verdict, forced.verdict, tcg.verdict) == (Verdict.OK,) * 2 + (Verdict.WARNING,)
    else:
        assert (auto.verdict, forced.verdict, tcg.verdict) == (
            Verdict.WARNING, Verdict.PROBLEM, Verdict.OK,
        )  # fmt: skip
        assert "TCG" in auto.found and auto.fix and "no guest can boot" in forced.found


async def test_a_missing_qemu_is_a_problem_with_its_package(short_dir: Path) -> None:
    found = await _findings(data_dir=short_dir, qemu_binary="/nonexistent/qemu-system-x86_64")
    assert found["qemu"].verdict is Verdict.PROBLEM
    assert "not installed" in found["qemu"].found and "qemu-system-x86" in found["qemu"].fix
    assert found["kvm"].found == "not probed: QEMU is missing"
    lines, status = render_findings(list(found.values()))
    assert status == 1 and lines[-1].startswith("1 problem, ")
    assert any(line.strip().startswith("fix: apt-get install qemu-system-x86") for line in lines)


async def test_other_drivers_get_their_own_checks(short_dir: Path) -> None:
    vmware = await _findings(data_dir=short_dir, driver="vmware")
    assert set(vmware) == {"data dir", "free space", "vmrun"}
    assert vmware["vmrun"].verdict is Verdict.PROBLEM and "vmrun" in vmware["vmrun"].found
    fake = short_dir / "vmrun"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    configured = await _findings(
        data_dir=short_dir, driver="vmware", vmware=VMwareConfig(vmrun=str(fake))
    )
    assert configured["vmrun"] == Finding("vmrun", Verdict.OK, str(fake))
    assert set(await _findings(data_dir=short_dir, driver="synthetic")) == {
        "data dir",
        "free space",
    }


def _doctor_as(short_dir: Path, *setpriv: str) -> dict[str, dict[str, str]]:
    """The findings of the doctor run in a process that ``setpriv`` changed."""
    code = (
        "import asyncio, json, sys; from pathlib import Path\n"
        "from goldclone.doctor import check_host; from goldclone.settings import Settings\n"
        "found = asyncio.run(check_host(Settings(data_dir=Path(sys.argv[1]))))\n"
        "print(json.dumps([finding.as_json() for finding in found]))"
    )
    argv = ["setpriv", *setpriv, "--", sys.executable, "-c", code, str(short_dir)]
    result = subprocess.run(argv, capture_output=True, text=True, check=True)
    return {finding["name"]: finding for finding in json.loads(result.stdout)}


def test_another_user_lacks_the_capabilities_and_is_told_which(short_dir: Path) -> None:
    found = _doctor_as(short_dir, "--reuid=65534", "--regid=65534", "--clear-groups")
    privileges = found["privileges"]
    assert privileges["verdict"] == "problem" and privileges["found"].startswith("user 65534")
    assert all(name in privileges["found"] for name in NEEDED_CAPABILITIES)
    assert "as root" in privileges["fix"]


def test_root_without_net_admin_in_its_bounding_set_is_a_problem(short_dir: Path) -> None:
    privileges = _doctor_as(short_dir, "--bounding-set=-net_admin")["privileges"]
    assert privileges["verdict"] == "problem"
    assert "CAP_NET_ADMIN (bridges, taps and nftables rules)" in privileges["found"]
    assert "CAP_NET_RAW" not in privileges["found"]


def test_ambient_capabilities_are_enough_for_another_user() -> None:
    every = sum(1 << bit for bit, _ in NEEDED_CAPABILITIES.values())
    status = f"CapInh:\t{every:016x}\nCapEff:\t{every:016x}\nCapBnd:\t{every:016x}\n"
    assert capabilities(status + f"CapAmb:\t{every:016x}\n", 1000).verdict is Verdict.OK
    assert capabilities(status + "CapAmb:\t0000000000000000\n", 1000).verdict is Verdict.PROBLEM
    assert capabilities(status + "CapAmb:\t0000000000000000\n", 0).verdict is Verdict.OK


async def test_a_data_dir_path_too_long_for_qmp_sockets_is_a_problem(short_dir: Path) -> None:
    found = await _findings(data_dir=short_dir / ("d" * 60))
    assert found["data dir"].verdict is Verdict.PROBLEM and "too long" in found["data dir"].found


async def test_a_read_only_filesystem_is_a_problem(short_dir: Path) -> None:
    with _mounted(short_dir / "ro", "-o", "ro") as folder:
        found = (await _findings(data_dir=folder / "data"))["data dir"]
    assert found.verdict is Verdict.PROBLEM and "Read-only file system" in found.found


async def test_a_data_dir_in_memory_is_a_warning_and_its_type_is_named(short_dir: Path) -> None:
    with _mounted(short_dir / "mem", "-o", "size=64m") as folder:
        (folder / "data").mkdir()
        found = await _findings(data_dir=folder / "data", reserve_mb=16)
        assert [path.name for path in folder.iterdir()] == ["data"]  # no scratch files left
        assert list((folder / "data").iterdir()) == []
    assert found["data dir"].verdict is Verdict.WARNING
    assert f"(tmpfs on {folder})" in found["data dir"].found and "reboot" in found["data dir"].found
    assert found["free space"].verdict is Verdict.WARNING  # 64 MB: under 1 GB for images


async def test_free_space_is_weighed_against_the_reserve_and_the_cache_budget(
    short_dir: Path,
) -> None:
    with _mounted(short_dir / "small", "-o", "size=64m") as folder:
        reserve = (await _findings(data_dir=folder, reserve_mb=64))["free space"]
        budget = await _findings(data_dir=folder, reserve_mb=1, image_cache_bytes=1 << 30)
    assert reserve.verdict is Verdict.PROBLEM and "no download can start" in reserve.found
    assert budget["free space"].verdict is Verdict.WARNING
    assert "image cache's budget (1024 MB)" in budget["free space"].found


def test_the_mount_of_a_path_is_the_longest_mount_point_above_it() -> None:
    mountinfo = (
        "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
        "40 27 0:50 / /var/lib rw - xfs /dev/vdb rw\n"
        "41 40 0:51 / /var/lib/with\\040space rw shared:7 - btrfs /dev/vdc rw\n"
    )
    assert mount_of(Path("/home/x"), mountinfo) == ("/", "ext4")
    assert mount_of(Path("/var/lib/goldclone"), mountinfo) == ("/var/lib", "xfs")
    assert mount_of(Path("/var/lib/with space/d"), mountinfo) == ("/var/lib/with space", "btrfs")
    assert mount_of(Path("/var/library"), mountinfo) == ("/", "ext4")
