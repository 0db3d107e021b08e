"""The QEMU driver's parts that stand alone: the accelerator probe, the command runner, its
command lines and disk clones."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import sys
import time
from pathlib import Path

import pytest

from goldclone.drivers.base import MachineSpec, TemplateFiles
from goldclone.drivers.qemu import QemuDriver
from goldclone.drivers.qemu.accel import choose_accel, runs_guest
from goldclone.drivers.qemu.network import Attachment, Networks
from goldclone.errors import CommandError, CommandTimeout
from goldclone.guest.config import GuestConfig
from goldclone.host.commands import run
from goldclone.images.checks.disks import DiskImage
from goldclone.images.gold import GoldImage
from goldclone.settings import NetworkConfig, Settings
from tests.harness import disk_info, processes_mentioning


async def test_the_probe_firmware_runs_under_tcg() -> None:
    assert await runs_guest("qemu-system-x86_64", "tcg") is True


async def test_the_probe_fails_for_an_accelerator_that_does_not_exist() -> None:
    assert await runs_guest("qemu-system-x86_64", "no-such-accel") is False


async def test_forced_accelerators_are_kept() -> None:
    assert await choose_accel("tcg", "qemu-system-x86_64") == "tcg"
    assert await choose_accel("kvm", "qemu-system-x86_64") == "kvm"


async def test_auto_falls_back_to_tcg_without_virtualisation_flags() -> None:
    flags = Path("/proc/cpuinfo").read_text()
    if " vmx" in flags or " svm" in flags:
        pytest.fail("this host has virtualisation flags; the test expects a TCG-only host")
    assert await choose_accel("auto", "qemu-system-x86_64") == "tcg"


async def test_run_reports_the_first_stderr_line() -> None:
    with pytest.raises(CommandError) as caught:
        await run("sh", "-c", "echo; echo 'first problem' >&2; echo second >&2; exit 3")
    assert caught.value.returncode == 3
    assert caught.value.stderr_line == "first problem"
    assert "first problem" in caught.value.message


async def test_run_kills_a_program_that_overruns() -> None:
    marker = f"sleep-marker-{time.monotonic_ns()}"
    with pytest.raises(CommandTimeout):
        await run(*_sleeper(marker), timeout=0.3)
    assert processes_mentioning(marker) == []


async def test_run_kills_the_program_when_cancelled() -> None:
    marker = f"sleep-marker-{time.monotonic_ns()}"
    task = asyncio.create_task(run(*_sleeper(marker)))
    while not processes_mentioning(marker):
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert processes_mentioning(marker) == []


def _sleeper(marker: str) -> list[str]:
    return [sys.executable, "-c", "import time; time.sleep(30)", marker]


async def test_run_names_a_missing_program() -> None:
    with pytest.raises(CommandError, match="not installed"):
        await run("no-such-program-here")


NIC = Attachment(
    "282ee68a-2e4d-4bd7-9c0e-7f37e12fc489", "nat", "52:54:00:12:34:56", "gcnat0", "gc282ee68a2e4d"
)


def _spec(headless: bool) -> MachineSpec:
    machine = "282ee68a-2e4d-4bd7-9c0e-7f37e12fc489"
    return MachineSpec(machine, 2, 512, headless, GuestConfig(machine, "vm-282ee68a"))


def _driver(data_dir: str) -> QemuDriver:
    path = Path(data_dir)
    return QemuDriver(path, Networks(NetworkConfig(), path / "networks"), accel="tcg")


def test_qemu_gets_only_absolute_paths_whatever_the_services_working_folder() -> None:
    argv = _driver("relative-data").command_line(_spec(headless=True), NIC)
    paths = [token for part in argv for token in re.split(r"[,=]|:(?=/)", part)
             if "relative-data" in token]  # fmt: skip
    # the disk, the seed, the metadata, the console log, the QMP, agent and helper sockets,
    # the pidfile
    assert len(paths) == 8
    assert all(Path(path).is_absolute() for path in paths), paths
    assert argv[argv.index("-smp") : argv.index("-smp") + 2] == ["-smp", "2"]
    assert "spawn=deny" in argv[argv.index("-sandbox") + 1]  # no fork or exec, ever
    assert argv[argv.index("-m") : argv.index("-m") + 2] == ["-m", "512"]
    devices = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-device"]
    [nic] = [device for device in devices if device.startswith("virtio-net-pci,")]
    assert "mac=52:54:00:12:34:56" in nic and "addr=0x3" in nic


def test_a_restored_machine_maps_the_template_privately_and_plugs_its_nic_later() -> None:
    files = TemplateFiles(Path("/d/templates/t"))
    template = dataclasses.replace(_spec(headless=True), template=files)
    restored = dataclasses.replace(template, restore=True)
    made, again = (_driver("/d").command_line(spec, NIC) for spec in (template, restored))
    assert f"mem-path={files.ram},share=on" in made[made.index("-object") + 1]
    assert f"mem-path={files.ram},share=off" in again[again.index("-object") + 1]
    assert "-incoming" not in made and again[again.index("-incoming") :][:3] == [
        "-incoming", "defer", "-S",
    ]  # fmt: skip
    assert not any(arg.startswith("virtio-net-pci") for arg in again)
    # the same devices at the same addresses, but for the NIC and a new generation ID
    assert [a for a in made if "addr=" in a and "virtio-net" not in a] == [
        a for a in again if "addr=" in a
    ]
    assert "vmgenid,id=vmgen0" in made and any(
        a.startswith("vmgenid,id=vmgen0,guid=") for a in again
    )


async def test_a_restored_machines_disk_is_the_templates_overlay_or_one_made_on_its_disk(
    tmp_path: Path, settings: Settings
) -> None:
    """A copy of the template's empty overlay; for a template of an earlier release, which has
    none, one made by qemu-img. Either is the machine's own, on the template's disk."""
    files = TemplateFiles(tmp_path / "templates" / "t")
    files.folder.mkdir(parents=True)
    await run("qemu-img", "create", "-q", "-f", "qcow2", str(files.disk), "1M", timeout=30)
    driver = _driver(str(settings.data_dir))
    gold = GoldImage("sha256-x", tmp_path, DiskImage(files.disk, "qcow2"), None)
    await driver.clone("older", gold, files)
    await run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(files.disk), "-F", "qcow2",
              "-o", "cluster_size=4096", str(files.overlay), timeout=30)  # fmt: skip
    await driver.clone("newer", gold, files)
    older, newer = (driver.vm_dir(name) / "disk.qcow2" for name in ("older", "newer"))
    for disk in (older, newer):
        assert (await disk_info(disk))["backing-filename"] == str(files.disk)
    assert (await disk_info(newer))["cluster-size"] == 4096  # the copy, not a new one
    assert newer.read_bytes() == files.overlay.read_bytes()
    assert newer.stat().st_mode & 0o777 == 0o600


def test_headless_means_no_display() -> None:
    driver = _driver("/d")
    headless = driver.command_line(_spec(headless=True), NIC)
    assert headless[headless.index("-display") + 1] == "none"
    shown = driver.command_line(_spec(headless=False), NIC)
    assert shown[shown.index("-display") + 1].startswith("vnc=unix:/d/vms/")
