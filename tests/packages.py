"""Image packages made from the demo guest's disk, in each format the API accepts."""

from __future__ import annotations

import io
import subprocess
import tarfile
import zipfile
from pathlib import Path

VMX = """\
.encoding = "UTF-8"
config.version = "8"
virtualHW.version = "14"
displayName = "goldclone demo"
annotation = "built for the tests|0Abase64 tail: aGk="
numvcpus = "1"
memsize = "256"
scsi0.present = "TRUE"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "demo.vmdk"
ethernet0.present = "TRUE"
"""


def extract_disk(demo_package: Path, dest: Path) -> Path:
    """The ``disk.qcow2`` inside the demo package."""
    with tarfile.open(demo_package) as tar:
        member = tar.getmember("disk.qcow2")
        source = tar.extractfile(member)
        assert source is not None
        dest.write_bytes(source.read())
    return dest


def make_package(disk: Path, kind: str, out: Path) -> Path:
    """Package ``disk`` (qcow2) as ``kind``: tar.gz, tar.bz2, tar, zip, qcow2 or vmware."""
    if kind == "qcow2":
        out.write_bytes(disk.read_bytes())
    elif kind in ("tar.gz", "tar.bz2", "tar"):
        mode = {"tar.gz": "w:gz", "tar.bz2": "w:bz2", "tar": "w"}[kind]
        with tarfile.open(out, mode) as tar:
            tar.add(disk, arcname="disk.qcow2")
            _add_text(tar, "metadata.json", '{"name": "demo"}')
    elif kind == "zip":
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.write(disk, "disk.qcow2")
    elif kind == "vmware":
        vmdk = out.parent / f"{out.name}.vmdk"
        subprocess.run(
            ["qemu-img", "convert", "-f", "qcow2", "-O", "vmdk", str(disk), str(vmdk)], check=True
        )
        with tarfile.open(out, "w:gz") as tar:
            tar.add(vmdk, arcname="demo.vmwarevm/demo.vmdk")
            _add_text(tar, "demo.vmwarevm/demo.vmx", VMX)
        vmdk.unlink()
    else:
        raise ValueError(kind)
    return out


def _add_text(tar: tarfile.TarFile, name: str, text: str) -> None:
    data = text.encode()
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
