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


def make_package(disk: Path, kind: str, out: Path, vmx: str = VMX) -> Path:
    """Package ``disk`` (qcow2) as ``kind``: tar.gz, tar.bz2, tar, zip or qcow2; or converted
    to a VMDK in a VMware VM folder with ``vmx``, archived as ``vmware`` (tar.gz),
    ``vmware-tar.bz2``, ``vmware-tar`` or ``vmware-zip``."""
    if kind == "qcow2":
        out.write_bytes(disk.read_bytes())
    elif kind in _ARCHIVES:
        _archive(out, kind, {"disk.qcow2": disk, "metadata.json": '{"name": "demo"}'})
    elif kind.startswith("vmware") and (archive := _vmware_archive(kind)) in _ARCHIVES:
        vmdk = out.parent / f"{out.name}.vmdk"
        subprocess.run(
            ["qemu-img", "convert", "-f", "qcow2", "-O", "vmdk", str(disk), str(vmdk)], check=True
        )
        try:
            _archive(out, archive, {"demo.vmwarevm/demo.vmdk": vmdk, "demo.vmwarevm/demo.vmx": vmx})
        finally:
            vmdk.unlink()
    else:
        raise ValueError(kind)
    return out


_ARCHIVES = {"tar.gz": "w:gz", "tar.bz2": "w:bz2", "tar": "w", "zip": ""}


def _vmware_archive(kind: str) -> str:
    return kind.removeprefix("vmware").removeprefix("-") or "tar.gz"


def _archive(out: Path, kind: str, members: dict[str, Path | str]) -> None:
    """Write ``members`` (files, or text) into the archive ``out`` of ``kind``."""
    if kind == "zip":
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, member in members.items():
                if isinstance(member, Path):
                    archive.write(member, name)
                else:
                    archive.writestr(name, member)
        return
    with tarfile.open(out, _ARCHIVES[kind]) as tar:
        for name, member in members.items():
            if isinstance(member, Path):
                tar.add(member, arcname=name)
            else:
                _add_text(tar, name, member)


def _add_text(tar: tarfile.TarFile, name: str, text: str) -> None:
    data = text.encode()
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
