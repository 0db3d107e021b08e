"""The demo guest package: built for real from the host's kernel and busybox, then inspected."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import pathlib
import struct
import tarfile

import pytest

from goldclone.demo.image import build_demo_image, find_kernel, kernel_version
from goldclone.host.commands import run

QCOW2_MAGIC = b"QFI\xfb"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, str]:
    """Build one package for the whole module: ``(package path, returned sha256)``."""
    out = tmp_path_factory.mktemp("package") / "demo.tar.gz"
    return out, asyncio.run(build_demo_image(out))


@pytest.fixture(scope="module")
def disk(built: tuple[pathlib.Path, str]) -> bytes:
    package, _ = built
    with tarfile.open(package) as tar:
        member = tar.extractfile("disk.qcow2")
        assert member is not None
        return member.read()


@pytest.fixture(scope="module")
def boot_files(disk: bytes, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The files syslinux boots, copied out of the disk's FAT file system."""
    work = tmp_path_factory.mktemp("disk")
    (work / "disk.qcow2").write_bytes(disk)
    return asyncio.run(_copy_out(work, ["vmlinuz", "initrd.gz", "syslinux.cfg"]))


async def _copy_out(work: pathlib.Path, names: list[str]) -> dict[str, bytes]:
    fat = str(work / "fat.img")
    await run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(work / "disk.qcow2"), fat)
    for name in names:
        await run("mcopy", "-i", fat, f"::{name}", str(work / name))
    return {name: (work / name).read_bytes() for name in names}


def _cpio_entries(archive: bytes) -> dict[str, tuple[int, bytes]]:
    """Parse a newc cpio archive into ``{name: (mode, data)}``."""
    entries: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        assert archive[pos : pos + 6] == b"070701", f"bad cpio header at {pos}"
        fields = [int(archive[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_start = pos + 110
        name = archive[name_start : name_start + namesize - 1].decode()
        data_start = (name_start + namesize + 3) & ~3
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, archive[data_start : data_start + size])
        pos = (data_start + size + 3) & ~3


def test_returned_sha256_is_the_package_file(built: tuple[pathlib.Path, str]) -> None:
    package, sha256 = built
    assert sha256 == hashlib.sha256(package.read_bytes()).hexdigest()


def test_package_directory_holds_no_leftover_temp_file(built: tuple[pathlib.Path, str]) -> None:
    package, _ = built
    assert list(package.parent.iterdir()) == [package]


def test_package_holds_only_disk_qcow2_owned_by_root(built: tuple[pathlib.Path, str]) -> None:
    package, _ = built
    with tarfile.open(package, "r:gz") as tar:
        members = tar.getmembers()
    assert [(m.name, m.isreg(), m.uid, m.gid) for m in members] == [("disk.qcow2", True, 0, 0)]


def test_disk_is_qcow2_without_backing_file(disk: bytes) -> None:
    assert disk[:4] == QCOW2_MAGIC
    (backing_file_offset,) = struct.unpack_from(">Q", disk, 8)
    assert backing_file_offset == 0


def test_disk_boots_the_host_kernel_quietly_on_the_serial_console(
    boot_files: dict[str, bytes],
) -> None:
    vmlinuz, _ = find_kernel()
    assert boot_files["vmlinuz"] == vmlinuz.read_bytes()
    config = boot_files["syslinux.cfg"].decode()
    assert "KERNEL vmlinuz" in config
    assert "APPEND initrd=initrd.gz console=ttyS0 quiet" in config


def test_initramfs_has_executable_init_and_static_busybox(boot_files: dict[str, bytes]) -> None:
    entries = _cpio_entries(gzip.decompress(boot_files["initrd.gz"]))
    init_mode, init = entries["init"]
    assert init_mode & 0o170111 == 0o100111
    assert init.startswith(b"#!/bin/sh\n")
    assert entries["bin/busybox"][1][:4] == b"\x7fELF"
    assert entries["dev/console"][0] & 0o170000 == 0o020000


def test_initramfs_loads_virtio_net_after_its_dependencies(boot_files: dict[str, bytes]) -> None:
    entries = _cpio_entries(gzip.decompress(boot_files["initrd.gz"]))
    load_order = entries["etc/modules"][1].decode().split()
    assert "virtio_net" in load_order
    assert load_order.index("virtio") < load_order.index("virtio_net")
    assert load_order.index("virtio_pci") < load_order.index("virtio_net")
    for module in load_order:
        assert entries[f"lib/modules/{module}.ko"][1][:4] == b"\x7fELF"


def test_kernel_version_is_read_from_the_kernel_itself() -> None:
    vmlinuz, version = find_kernel()
    assert kernel_version(vmlinuz) == version
