"""Build the tiny bootable demo and test guest as a real image package.

The package is a ``.tar.gz`` holding one ``disk.qcow2``: a FAT disk that syslinux boots into
the host's kernel and a busybox initramfs. The guest DHCPs on every NIC (also hot-plugged
ones), answers HTTP on port 80 with its MAC addresses, and powers off on the ACPI power button.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import importlib.resources
import io
import lzma
import os
import pathlib
import re
import stat
import struct
import tarfile
import tempfile

from goldclone.demo.python import GuestPython, guest_python, with_libraries
from goldclone.errors import GoldcloneError
from goldclone.host.commands import run

BOOT_DIR = pathlib.Path("/boot")
MODULES_DIR = pathlib.Path("/lib/modules")
BUSYBOX = pathlib.Path("/bin/busybox")
_PT_INTERP = 3  # an ELF program header that names a dynamic loader

# virtio_pci finds the devices, virtio_net drives the NICs, and acpid reads power button
# presses from button through an evdev device; virtio_blk and isofs read the NoCloud seed,
# qemu_fw_cfg the metadata in fw_cfg, virtio_console gives qemu-ga its port.
GUEST_MODULES = ("virtio_pci", "virtio_net", "evdev", "button", "virtio_blk", "isofs",
                 "qemu_fw_cfg", "virtio_console")  # fmt: skip
GUEST_AGENT = pathlib.Path("/usr/sbin/qemu-ga")
"""Debian's qemu-guest-agent, copied into the guest with the libraries it loads."""

# no_timer_check: on a loaded host a TCG guest's early check of the IO-APIC timer can miss its
# ticks and panic the kernel ("IO-APIC + timer doesn't work!"; seen with 20 cold boots at once).
# acpi=noirq: PCI interrupts are routed by the firmware's table, not by ACPI's _PRT, which QEMU's
# pc machine builds in a 128-step AML loop that the kernel runs each time it enables a device:
# 0.2-0.3 CPU-s under TCG for every NIC plugged into or unplugged from a guest (docs/design.md).
SYSLINUX_CFG = """\
DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  KERNEL vmlinuz
  APPEND initrd=initrd.gz console=ttyS0 quiet no_timer_check acpi=noirq
"""

DISK_NAME = "disk.qcow2"
FAT_KIB = "65536"
TIMEOUT = 30.0

_GUEST_DIRS = (
    "bin",
    "sbin",
    "usr",
    "usr/bin",
    "usr/sbin",
    "dev",
    "proc",
    "sys",
    "tmp",
    "etc",
    "etc/acpi",
    "etc/acpi/PWRF",
    "seed",
    "root",
    "root/.ssh",
    "lib",
    "lib/modules",
    "var",
    "var/log",
    "var/run",
    "www",
    "www/cgi-bin",
)
# Packaged guest file -> its path in the initramfs. busybox acpid runs PWRF/00000080 from
# /etc/acpi on a power button press; busybox httpd runs cgi-bin/index.cgi for "/".
_GUEST_SCRIPTS = {
    "init": "init",
    "udhcpc.script": "etc/udhcpc.script",
    "power-button": "etc/acpi/PWRF/00000080",
    "configure": "sbin/configure",
    "agent": "sbin/agent",
    "helper": "sbin/helper",
    "nic-added": "sbin/nic-added",
    "mdev.conf": "etc/mdev.conf",
    "index.cgi": "www/cgi-bin/index.cgi",
}


def find_kernel() -> tuple[pathlib.Path, str]:
    """Return the newest ``/boot/vmlinuz-*`` that has modules installed, and its version."""
    found: list[tuple[tuple[int, ...], pathlib.Path, str]] = []
    for vmlinuz in BOOT_DIR.glob("vmlinuz-*"):
        version = vmlinuz.name.removeprefix("vmlinuz-")
        if (MODULES_DIR / version).is_dir():
            found.append((_version_key(version), vmlinuz, version))
    if not found:
        raise GoldcloneError(
            f"no kernel with modules found (no {BOOT_DIR}/vmlinuz-VERSION with "
            f"{MODULES_DIR}/VERSION); install linux-image-amd64 or linux-image-cloud-amd64"
        )
    _, vmlinuz, version = max(found)
    return vmlinuz, version


def kernel_version(vmlinuz: pathlib.Path) -> str:
    """Read the kernel release (like ``uname -r``) from an x86 bzImage's setup header."""
    with vmlinuz.open("rb") as f:
        head = f.read(64 * 1024)
    if head[0x202:0x206] != b"HdrS":
        raise GoldcloneError(f"{vmlinuz} is not an x86 bzImage kernel")
    (offset,) = struct.unpack_from("<H", head, 0x20E)
    version = head[offset + 0x200 :].split(b" ", 1)[0].decode(errors="replace")
    if not version:
        raise GoldcloneError(f"{vmlinuz} does not name its kernel version")
    return version


def _kernel(vmlinuz: pathlib.Path | None) -> tuple[pathlib.Path, str]:
    if vmlinuz is None:
        return find_kernel()
    version = kernel_version(vmlinuz)
    if not (MODULES_DIR / version).is_dir():
        raise GoldcloneError(f"{vmlinuz} is kernel {version}, which has no {MODULES_DIR}/{version}")
    return vmlinuz, version


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


async def build_demo_image(out: pathlib.Path, *, kernel: pathlib.Path | None = None) -> str:
    """Build the demo guest package at `out` (a tar.gz holding disk.qcow2).

    Returns the package's sha256 hex digest. `out` appears only once it is complete.
    """
    vmlinuz, version = await asyncio.to_thread(_kernel, kernel)
    modules = await _module_files(version, GUEST_MODULES)
    python = await guest_python()
    programs = list(dict.fromkeys([*await _agent_files(), *python.programs]))
    with tempfile.TemporaryDirectory(prefix="goldclone-demo-") as tmp:
        work = pathlib.Path(tmp)
        await asyncio.to_thread(_write_boot_files, work, modules, programs, python)
        disk = await _make_disk(work, vmlinuz)
        return await asyncio.to_thread(_package, disk, out)


async def _module_files(version: str, roots: tuple[str, ...]) -> list[tuple[str, pathlib.Path]]:
    """Return ``(name, file)`` of the roots and their dependencies, in load order.

    Modules built into the kernel have no file and are left out.
    """
    ordered: list[tuple[str, pathlib.Path]] = []
    seen: set[str] = set()

    async def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        _, depends, _ = await run("modinfo", "-k", version, "-F", "depends", name, timeout=TIMEOUT)
        for dep in filter(None, depends.strip().split(",")):
            await visit(dep)
        _, filename, _ = await run("modinfo", "-k", version, "-n", name, timeout=TIMEOUT)
        filename = filename.strip()
        if filename != "(builtin)":
            ordered.append((name, pathlib.Path(filename)))

    for root in roots:
        await visit(root)
    return ordered


async def _agent_files() -> list[pathlib.Path]:
    """qemu-ga and every shared library it loads, by host path."""
    if not GUEST_AGENT.is_file():
        raise GoldcloneError(f"{GUEST_AGENT} is missing: install qemu-guest-agent")
    return await with_libraries([GUEST_AGENT])


def _write_boot_files(
    work: pathlib.Path,
    modules: list[tuple[str, pathlib.Path]],
    programs: list[pathlib.Path],
    python: GuestPython,
) -> None:
    initramfs = _initramfs(modules, programs, python)
    (work / "initrd.gz").write_bytes(gzip.compress(initramfs, 6, mtime=0))
    (work / "syslinux.cfg").write_text(SYSLINUX_CFG)


async def _make_disk(work: pathlib.Path, vmlinuz: pathlib.Path) -> pathlib.Path:
    """Make a syslinux-bootable FAT image without mounting it, and convert it to qcow2."""
    fat, disk = str(work / "fat.img"), work / DISK_NAME
    await run("mkfs.vfat", "-C", fat, FAT_KIB, timeout=TIMEOUT)
    await run("syslinux", "--install", fat, timeout=TIMEOUT)
    await run("mcopy", "-i", fat, str(vmlinuz), "::vmlinuz", timeout=TIMEOUT)
    boot_files = [str(work / "initrd.gz"), str(work / "syslinux.cfg")]
    await run("mcopy", "-i", fat, *boot_files, "::", timeout=TIMEOUT)
    await run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", fat, str(disk), timeout=TIMEOUT)
    return disk


def _initramfs(
    modules: list[tuple[str, pathlib.Path]], programs: list[pathlib.Path], python: GuestPython
) -> bytes:
    """Return the guest's uncompressed newc cpio archive: ``programs`` at their host paths."""
    cpio = _Cpio()
    folders = set(_GUEST_DIRS)
    for directory in _GUEST_DIRS:
        cpio.add_dir(directory)
    made = {str(path.relative_to("/")): (path.read_bytes(), 0o755) for path in programs}
    made |= {name: (data, 0o644) for name, data in python.made.items()}
    for name, (data, mode) in made.items():
        for parent in reversed(pathlib.PurePath(name).parents[:-1]):
            if str(parent) not in folders:
                folders.add(str(parent))
                cpio.add_dir(str(parent))
        cpio.add_file(name, data, mode)
    for name, target in python.links.items():
        cpio.add_symlink(name, target)
    # The kernel opens /dev/console for init before init can mount devtmpfs.
    cpio.add_char_device("dev/console", 5, 1)
    cpio.add_file("bin/busybox", _static_busybox(), 0o755)
    cpio.add_symlink("bin/sh", "busybox")
    guest = importlib.resources.files("goldclone.demo").joinpath("guest")
    for source, target in _GUEST_SCRIPTS.items():
        cpio.add_file(target, guest.joinpath(source).read_bytes(), 0o755)
    for name, path in modules:
        cpio.add_file(f"lib/modules/{name}.ko", _module_bytes(path), 0o644)
    load_order = "".join(f"{name}\n" for name, _ in modules)
    cpio.add_file("etc/modules", load_order.encode(), 0o644)
    return cpio.finish()


def _static_busybox() -> bytes:
    """Return the busybox binary, which must be static: the initramfs has no libc."""
    data = BUSYBOX.read_bytes() if BUSYBOX.is_file() else b""
    if data[:5] != b"\x7fELF\x02":
        raise GoldcloneError(
            f"{BUSYBOX} is missing or not a 64-bit program: install busybox-static"
        )
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for index in range(phnum):
        (segment_type,) = struct.unpack_from("<I", data, phoff + index * phentsize)
        if segment_type == _PT_INTERP:
            raise GoldcloneError(f"{BUSYBOX} is linked dynamically: install busybox-static")
    return data


def _module_bytes(path: pathlib.Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".ko":
        return data
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    raise GoldcloneError(f"cannot decompress kernel module {path}: only .ko, .ko.xz and .ko.gz")


class _Cpio:
    """Writes a cpio archive in the "newc" format that the kernel unpacks as initramfs."""

    def __init__(self) -> None:
        self._buffer = io.BytesIO()
        self._inode = 0

    def add_dir(self, name: str) -> None:
        self._add(name, stat.S_IFDIR | 0o755, b"", nlink=2)

    def add_file(self, name: str, data: bytes, mode: int) -> None:
        self._add(name, stat.S_IFREG | mode, data)

    def add_symlink(self, name: str, target: str) -> None:
        self._add(name, stat.S_IFLNK | 0o777, target.encode())

    def add_char_device(self, name: str, major: int, minor: int) -> None:
        self._add(name, stat.S_IFCHR | 0o600, b"", rdev=(major, minor))

    def finish(self) -> bytes:
        self._add("TRAILER!!!", 0, b"", inode=0)
        return self._buffer.getvalue()

    def _add(
        self,
        name: str,
        mode: int,
        data: bytes,
        *,
        nlink: int = 1,
        rdev: tuple[int, int] = (0, 0),
        inode: int | None = None,
    ) -> None:
        if inode is None:
            self._inode += 1
            inode = self._inode
        encoded = name.encode() + b"\0"
        # inode, mode, uid, gid, nlink, mtime, filesize, dev major/minor, rdev major/minor,
        # namesize, check
        fields = (inode, mode, 0, 0, nlink, 0, len(data), 0, 0, *rdev, len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % field for field in fields)
        self._write_padded(header + encoded)
        self._write_padded(data)

    def _write_padded(self, data: bytes) -> None:
        self._buffer.write(data)
        self._buffer.write(b"\0" * (-self._buffer.tell() % 4))


def _package(disk: pathlib.Path, out: pathlib.Path) -> str:
    """Write `disk` alone into the tar.gz `out` atomically; return the package's sha256."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    tmp = pathlib.Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw:
            _write_tar(disk, raw)
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o644)
        digest = _sha256(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest


def _write_tar(disk: pathlib.Path, raw: io.BufferedWriter) -> None:
    info = tarfile.TarInfo(DISK_NAME)
    info.size = disk.stat().st_size
    info.mode = 0o644
    info.mtime = int(disk.stat().st_mtime)
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    with (
        # The disk is mostly the compressed kernel: harder compression saves almost nothing.
        gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w") as tar,
        disk.open("rb") as f,
    ):
        tar.addfile(info, f)


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
