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
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from goldclone.errors import ImageError
from goldclone.images.unpack import UnpackLimits, unpack

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
