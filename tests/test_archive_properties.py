"""Property tests of the archive checker: whatever a tar holds, unpacking either refuses it
with an image error or writes only regular files and folders inside the destination."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from goldclone.errors import ImageError, ImageUnsafe, ImageUnsupported
from goldclone.images.checks import inspect_package
from goldclone.images.unpack import UnpackLimits, unpack
from tests.packages import VMX

SEGMENTS = st.sampled_from(
    ["a", "b", "disk.qcow2", "escaped", "..", ".", "", "c d", "ü", "x" * 100]
)
NAMES = st.builds(
    lambda absolute, parts: ("/" if absolute else "") + "/".join(parts),
    st.booleans(),
    st.lists(SEGMENTS, min_size=1, max_size=4),
)
KINDS = st.sampled_from(
    [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
     tarfile.FIFOTYPE]
)  # fmt: skip
MEMBERS = st.lists(
    st.tuples(NAMES, KINDS, st.binary(max_size=64), NAMES, st.integers(0, 0o7777)),
    max_size=8,
)
LIMITS = UnpackLimits(max_total_bytes=1 << 20, max_members=6)


def build_tar(members: list[tuple[str, bytes, bytes, str, int]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, data, target, mode in members:
            info = tarfile.TarInfo(name or ".")
            info.type, info.mode, info.linkname = kind, mode, target
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return out.getvalue()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(MEMBERS)
def test_unpacking_refuses_or_writes_only_plain_files_inside(
    members: list[tuple[str, bytes, bytes, str, int]],
) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        package, dest = root / "package", root / "dest"
        package.write_bytes(build_tar(members))
        dest.mkdir()
        try:
            unpack(package, dest, LIMITS)
        except ImageError:
            return  # refused: the caller removes whatever was written
        finally:
            assert not (root / "escaped").exists()
        written = 0
        for folder, dirs, files in os.walk(dest):
            for name in dirs + files:
                path = Path(folder, name)
                mode = path.lstat().st_mode
                assert stat.S_ISREG(mode) or stat.S_ISDIR(mode), path
                assert path.resolve().is_relative_to(dest.resolve())
                assert not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX)
            written += len(files)
        kinds = {kind for _, kind, *_ in members}
        assert kinds <= {tarfile.REGTYPE, tarfile.DIRTYPE}, "links and devices never pass"
        assert written == sum(1 for _, kind, *_ in members if kind == tarfile.REGTYPE)
        shutil.rmtree(dest)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_are_refused_cleanly(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        package, dest = Path(scratch, "package"), Path(scratch, "dest")
        package.write_bytes(data)
        dest.mkdir()
        with contextlib.suppress(ImageError):
            unpack(package, dest, LIMITS)


def _disk() -> bytes:
    disk = bytearray(4096)
    disk[510:512] = b"\x55\xaa"
    return bytes(disk)


_DESCRIPTOR = b"""# Disk DescriptorFile
version=1
CID=fffffffe
parentCID=ffffffff
createType="monolithicFlat"

RW 8 FLAT "disk-flat.vmdk" 0
"""


def _package(kind: str) -> bytes:
    """A small valid package of ``kind``: a raw disk in a folder and a text file; or, for
    ``vmware-tar``, a VMware VM with a flat VMDK."""
    members = {"vm/disk.raw": _disk(), "vm/notes.txt": b"hello\n" * 40}
    if kind == "vmware-tar":
        kind = "tar"
        members = {"vm/demo.vmx": VMX.encode(), "vm/demo.vmdk": _DESCRIPTOR,
                   "vm/disk-flat.vmdk": _disk()}  # fmt: skip
    out = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, data in members.items():
                archive.writestr(name, data)
        return out.getvalue()
    with tarfile.open(
        fileobj=out, mode={"tar": "w", "tar.gz": "w:gz", "tar.bz2": "w:bz2"}[kind]
    ) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


PACKAGES = {kind: _package(kind) for kind in ("zip", "tar", "tar.gz", "tar.bz2", "vmware-tar")}


def _zip_fields(data: bytes) -> list[tuple[int, int]]:
    """Where a zip keeps its offsets, sizes and counts, as ``(position, width)``: in each
    local header, each central directory entry, and the end record."""
    fields = []
    for signature, offsets in (
        (b"PK\x03\x04", ((18, 4), (22, 4), (26, 2), (28, 2))),
        (b"PK\x01\x02", ((20, 4), (24, 4), (28, 2), (30, 2), (42, 4))),
        (b"PK\x05\x06", ((8, 2), (10, 2), (12, 4), (16, 4))),
    ):
        at = data.find(signature)
        while at >= 0:
            fields += [(at + offset, width) for offset, width in offsets]
            at = data.find(signature, at + 1)
    return fields


FIELDS = {"zip": _zip_fields(PACKAGES["zip"])}
MUTATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(0, 7)),
        st.tuples(st.just("cut"), st.integers(0, 1 << 16), st.just(0)),
        st.tuples(st.just("field"), st.integers(0, 1 << 16), st.integers(-6000, 6000)),
    ),
    min_size=1,
    max_size=4,
)


def mutate(kind: str, mutations: list[tuple[str, int, int]]) -> bytes:
    """The package of ``kind`` truncated, with bits flipped, or with one of its offsets,
    sizes or counts (a zip's) moved by up to some thousands."""
    out = bytearray(PACKAGES[kind])
    for mutation, at, amount in mutations:
        if not out:
            break
        if mutation == "flip":
            out[at % len(out)] ^= 1 << amount
        elif mutation == "cut":
            del out[at % len(out) :]
        elif fields := [f for f in FIELDS.get(kind, []) if f[0] + f[1] <= len(out)]:
            start, width = fields[at % len(fields)]
            value = int.from_bytes(out[start : start + width], "little") + amount
            out[start : start + width] = (value % (1 << 8 * width)).to_bytes(width, "little")
    return bytes(out)


def check_refused_cleanly(data: bytes) -> None:
    """Unpacking and inspecting ``data`` either works or raises an image error; never
    anything that the service would answer with ``internal-error``."""
    with tempfile.TemporaryDirectory() as scratch:
        package, dest = Path(scratch, "package"), Path(scratch, "dest")
        package.write_bytes(data)
        dest.mkdir()
        with contextlib.suppress(ImageUnsafe, ImageUnsupported):
            unpack(package, dest, LIMITS)
            inspect_package(dest)


@pytest.mark.parametrize("kind", sorted(PACKAGES))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=MUTATIONS)
def test_damaged_archives_are_image_errors(
    kind: str, mutations: list[tuple[str, int, int]]
) -> None:
    check_refused_cleanly(mutate(kind, mutations))


def test_a_zip_whose_directory_offset_is_too_large_is_unsupported(tmp_path: Path) -> None:
    """The end-of-central-directory record claims the directory starts 5000 bytes later than
    it does, so zipfile computes negative member offsets (issue #15)."""
    data = bytearray(PACKAGES["zip"])
    end = data.rindex(b"PK\x05\x06")
    offset = int.from_bytes(data[end + 16 : end + 20], "little")
    data[end + 16 : end + 20] = (offset + 5000).to_bytes(4, "little")
    package, dest = tmp_path / "package.zip", tmp_path / "dest"
    package.write_bytes(bytes(data))
    dest.mkdir()
    with pytest.raises(ImageUnsupported, match="outside the zip archive"):
        unpack(package, dest, LIMITS)
