"""Each kind of bad input ends the VM in ``error`` with a clear code and leaves nothing behind."""

from __future__ import annotations

import dataclasses
import io
import os
import socket
import subprocess
import tarfile
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from goldclone.settings import Settings
from tests.conftest import checksum
from tests.harness import Goldclone, goldclone_server, leftovers
from tests.servers import FileServer

pytestmark = pytest.mark.root


def _tar(out: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> None:
    with tarfile.open(out, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name: str, kind: bytes, target: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def traversal(out: Path) -> None:
    _tar(out, _file("../../escaped.qcow2"))


def symlink(out: Path) -> None:
    _tar(out, _special("disk.qcow2", tarfile.SYMTYPE, "/etc/shadow"))


def hardlink(out: Path) -> None:
    _tar(out, _file("a"), _special("disk.qcow2", tarfile.LNKTYPE, "/etc/shadow"))


def device(out: Path) -> None:
    _tar(out, _special("disk.qcow2", tarfile.CHRTYPE))


def backing_file(out: Path) -> None:
    disk = out.with_suffix(".qcow2")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw",
         str(disk), "1M"],
        check=True,
    )  # fmt: skip
    _tar(out, _file("disk.qcow2", disk.read_bytes()))
    disk.unlink()


def unknown_format(out: Path) -> None:
    out.write_bytes(os.urandom(4096))


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (traversal, "image-unsafe"),
        (symlink, "image-unsafe"),
        (hardlink, "image-unsafe"),
        (device, "image-unsafe"),
        (backing_file, "image-unsafe"),
        (unknown_format, "image-unsupported"),
    ],
)
async def test_bad_packages_are_refused(
    goldclone: Goldclone, file_server: FileServer, make: Callable[[Path], None], code: str
) -> None:
    package = file_server.root / f"{uuid.uuid4().hex}.pkg"
    make(package)
    await assert_fails(goldclone, file_server.url(package.name), checksum(package), code)
    assert not (
        Path("/escaped.qcow2").exists() or package.parent.parent.joinpath("escaped.qcow2").exists()
    )


async def test_download_from_a_closed_port(goldclone: Goldclone) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    await assert_fails(goldclone, f"http://127.0.0.1:{port}/x.tar.gz", "0" * 64,
                       "download-failed")  # fmt: skip


async def test_download_that_stalls_times_out(
    settings: Settings, file_server: FileServer, demo_package: Path
) -> None:
    impatient = dataclasses.replace(settings, download_timeout=1.0)
    async with goldclone_server(impatient) as goldclone:
        message = await assert_fails(
            goldclone, file_server.url(f"stall/{demo_package.name}"), checksum(demo_package),
            "download-failed",
        )  # fmt: skip
        assert "timed out" in message


async def test_a_guest_that_never_gets_an_ip(settings: Settings, file_server: FileServer) -> None:
    """A disk with a partition table but nothing to boot: qemu runs, the guest never DHCPs."""
    disk = bytearray(1024 * 1024)
    disk[510:512] = b"\x55\xaa"
    package = file_server.root / f"{uuid.uuid4().hex}.raw"
    package.write_bytes(bytes(disk))
    patient = dataclasses.replace(settings, ip_timeout=3.0)
    async with goldclone_server(patient) as goldclone:
        await assert_fails(goldclone, file_server.url(package.name), checksum(package),
                           "ip-timeout", image_is_bad=False)  # fmt: skip


async def assert_fails(
    goldclone: Goldclone, url: str, digest: str, code: str, image_is_bad: bool = True
) -> str:
    body = {"cpus": 1, "memory": 128, "image": {"url": url, "checksum": digest}}
    vm = await goldclone.post_vm(body)
    failed = await goldclone.wait_for(vm["id"], "error")
    assert failed["error"]["code"] == code, failed["error"]
    assert failed["ip_address"] == ""
    assert failed["timeline"][-1]["phase"] == "error"
    assert str(goldclone.data_dir.absolute()) not in failed["error"]["message"]
    assert leftovers(goldclone.data_dir, failed) == []
    gold = list((goldclone.data_dir / "images").iterdir())
    if image_is_bad:
        assert gold == [], "no gold image from bad input"
    else:
        assert [path.name for path in gold] == [f"sha256-{digest}"], "a good image stays"
    message: str = failed["error"]["message"]
    return message
