"""Detecting and unpacking untrusted packages: every format, every rejection, every limit."""

from __future__ import annotations

import bz2
import gzip
import io
import os
import stat
import struct
import subprocess
import tarfile
import time
import tracemalloc
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from goldclone.errors import ImageUnsafe, ImageUnsupported
from goldclone.images.unpack import PackageFormat, UnpackLimits, detect_format, unpack

MiB = 1 << 20
Member = tuple[tarfile.TarInfo, bytes | None]


def _file(name: str, data: bytes = b"data", mode: int = 0o644) -> Member:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    return info, data


def _special(name: str, kind: bytes, linkname: str = "") -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def _dir(name: str, mode: int = 0o755) -> Member:
    return _special(name, tarfile.DIRTYPE)


def _tar_bytes(members: list[Member], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _write_tar(path: Path, members: list[Member], compression: str = "gz") -> Path:
    data = _tar_bytes(members)
    if compression == "gz":
        data = gzip.compress(data, compresslevel=1)
    elif compression == "bz2":
        data = bz2.compress(data, compresslevel=1)
    path.write_bytes(data)
    return path


def _write_zip(path: Path, members: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicates we make on purpose
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            for info, data in members:
                archive.writestr(info, data)
    return path


def _zip_info(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = mode << 16
    return info


def _qcow2(path: Path) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    return path


def _mbr_disk(path: Path, size: int = 4 * MiB) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
        f.seek(446)
        f.write(b"\x80" + bytes(15))  # one partition entry, then the boot signature
        f.seek(510)
        f.write(b"\x55\xaa")
    return path


def _tree(root: Path) -> dict[str, bytes | None]:
    found: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        found[path.relative_to(root).as_posix()] = None if path.is_dir() else path.read_bytes()
    return found


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    path = tmp_path / "dest"
    path.mkdir()
    return path


# -- detection ---------------------------------------------------------------------------

MEMBERS = [_dir("vm"), _file("vm/disk.img", b"disk bytes" * 1000), _file("meta.json", b"{}")]


def _package(kind: str, path: Path) -> Path:
    if kind in ("tar.gz", "tar.bz2", "tar"):
        return _write_tar(path, MEMBERS, kind.removeprefix("tar").removeprefix("."))
    if kind == "zip":
        return _write_zip(
            path, [("vm/", b""), ("vm/disk.img", b"disk bytes" * 1000), ("meta.json", b"{}")]
        )
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "misleading_name", "expected"),
    [
        ("tar.gz", "image.zip", PackageFormat.TAR_GZ),
        ("tar.bz2", "image.tar.gz", PackageFormat.TAR_BZ2),
        ("zip", "image.tar", PackageFormat.ZIP),
        ("tar", "image.qcow2", PackageFormat.TAR),
    ],
)
def test_archives_are_detected_by_content(
    tmp_path: Path, dest: Path, kind: str, misleading_name: str, expected: PackageFormat
) -> None:
    package = _package(kind, tmp_path / misleading_name)
    assert detect_format(package) is expected
    assert unpack(package, dest) is expected
    assert _tree(dest) == {"meta.json": b"{}", "vm": None, "vm/disk.img": b"disk bytes" * 1000}


def test_disks_are_detected_by_content(tmp_path: Path) -> None:
    assert detect_format(_qcow2(tmp_path / "disk.txt")) is PackageFormat.QCOW2
    sparse = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(sparse), "8M"], check=True)
    assert detect_format(sparse) is PackageFormat.VMDK
    descriptor = tmp_path / "descriptor.bin"
    descriptor.write_bytes(b"# Disk DescriptorFile\nversion=1\n")
    assert detect_format(descriptor) is PackageFormat.VMDK
    assert detect_format(_mbr_disk(tmp_path / "mbr.vmdk")) is PackageFormat.RAW
    gpt = tmp_path / "gpt"
    gpt.write_bytes(bytes(512) + b"EFI PART" + bytes(1024))
    assert detect_format(gpt) is PackageFormat.RAW


def test_an_empty_zip_is_a_zip(tmp_path: Path, dest: Path) -> None:
    package = _write_zip(tmp_path / "empty.tar.gz", [])
    assert detect_format(package) is PackageFormat.ZIP
    assert unpack(package, dest) is PackageFormat.ZIP
    assert _tree(dest) == {}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is not a tar"),
        (b"just some text\n" * 100, "is not a tar"),
        (bytes(4 * MiB), "is not a tar"),  # a raw disk without MBR or GPT
        (gzip.compress(b"not a tar" * 100, mtime=0), "gzip data, but not a tar archive"),
        (bz2.compress(b"not a tar" * 100), "bzip2 data, but not a tar archive"),
        (gzip.compress(bytes(MiB), mtime=0), "gzip data, but not a tar archive"),
    ],
    # named, not by their bytes: a gzip header's time made two workers collect two names
    ids=["empty", "text", "raw-disk", "gzip-text", "bzip2-text", "gzip-zeros"],
)
def test_anything_else_is_unsupported(tmp_path: Path, content: bytes, message: str) -> None:
    package = tmp_path / "package.tar.gz"
    package.write_bytes(content)
    with pytest.raises(ImageUnsupported, match=message):
        detect_format(package)


# -- unpacking ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "make", "name"),
    [
        (PackageFormat.QCOW2, _qcow2, "disk.qcow2"),
        (PackageFormat.RAW, _mbr_disk, "disk.raw"),
    ],
)
def test_a_bare_disk_is_copied_under_a_fixed_name(
    tmp_path: Path, dest: Path, fmt: PackageFormat, make: Callable[[Path], Path], name: str
) -> None:
    download = make(tmp_path / "download.part")
    assert unpack(download, dest) is fmt
    assert os.listdir(dest) == [name]
    assert (dest / name).read_bytes() == download.read_bytes()
    assert download.exists()


def test_a_bare_vmdk_is_copied_as_disk_vmdk(tmp_path: Path, dest: Path) -> None:
    download = tmp_path / "download.part"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(download), "8M"], check=True)
    assert unpack(download, dest) is PackageFormat.VMDK
    assert (dest / "disk.vmdk").read_bytes() == download.read_bytes()


def test_modes_come_from_us_not_from_the_archive(tmp_path: Path, dest: Path) -> None:
    package = _write_tar(
        tmp_path / "p.tar.gz",
        [_special("bin", tarfile.DIRTYPE), _file("bin/tool", b"#!", mode=0o6777)],
    )
    unpack(package, dest)
    for path, allowed in ((dest / "bin", 0o755), (dest / "bin/tool", 0o644)):
        assert stat.S_IMODE(path.stat().st_mode) & ~allowed == 0


def test_dot_slash_names_and_later_directory_entries_are_fine(tmp_path: Path, dest: Path) -> None:
    members = [_dir("."), _file("./a/b/disk.img"), _dir("./a/"), _dir("a/b"), _file("c//d")]
    unpack(_write_tar(tmp_path / "p.tar", members, ""), dest)
    assert _tree(dest) == {
        "a": None,
        "a/b": None,
        "a/b/disk.img": b"data",
        "c": None,
        "c/d": b"data",
    }


def test_runs_of_zeros_become_holes(tmp_path: Path, dest: Path) -> None:
    content = b"boot" + bytes(16 * MiB) + b"data" + bytes(4 * MiB)
    unpack(_write_tar(tmp_path / "p.tgz", [_file("disk.raw", content)]), dest)
    extracted = dest / "disk.raw"
    assert extracted.read_bytes() == content
    assert extracted.stat().st_blocks * 512 < 4 * MiB


def test_gnu_sparse_members_are_extracted(tmp_path: Path, dest: Path) -> None:
    """GNU tar (essential on Debian) writes the sparse member."""
    source = tmp_path / "src"
    source.mkdir()
    with (source / "disk.raw").open("wb") as f:
        f.write(b"start")
        f.seek(32 * MiB)
        f.write(b"end")
    package = tmp_path / "sparse.tar.gz"
    subprocess.run(["tar", "-S", "-czf", str(package), "-C", str(source), "disk.raw"], check=True)
    unpack(package, dest)
    assert (dest / "disk.raw").read_bytes() == (source / "disk.raw").read_bytes()


def test_concatenated_and_padded_gzip_streams_are_read(tmp_path: Path, dest: Path) -> None:
    data = _tar_bytes([_file("a", b"1" * 5000), _file("b", b"2" * 5000)])
    package = tmp_path / "p.tar.gz"
    package.write_bytes(gzip.compress(data[:3000]) + gzip.compress(data[3000:]) + bytes(1024))
    unpack(package, dest)
    assert _tree(dest) == {"a": b"1" * 5000, "b": b"2" * 5000}


def test_a_non_empty_destination_is_refused(tmp_path: Path, dest: Path) -> None:
    (dest / "left over").write_bytes(b"")
    with pytest.raises(ValueError, match=r"not empty"):
        unpack(_qcow2(tmp_path / "d.qcow2"), dest)


# -- unsafe members ----------------------------------------------------------------------

UNSAFE_TAR_MEMBERS: list[tuple[list[Member], str, str]] = [
    ([_file("../evil")], "../evil", "'..' component"),
    ([_file("a/../../evil")], "a/../../evil", "'..' component"),
    ([_file("/etc/evil")], "/etc/evil", "absolute path"),
    ([_special("link", tarfile.SYMTYPE, "/etc/passwd")], "link", "symbolic link"),
    ([_file("a"), _special("hard", tarfile.LNKTYPE, "a")], "hard", "hard link"),
    ([_special("console", tarfile.CHRTYPE)], "console", "device"),
    ([_special("sda", tarfile.BLKTYPE)], "sda", "device"),
    ([_special("pipe", tarfile.FIFOTYPE)], "pipe", "fifo"),
    ([_file("disk"), _file("disk")], "disk", "more than once"),
    ([_file("disk"), _file("./disk")], "./disk", "more than once"),
    ([_dir("d"), _dir("d/")], "d", "more than once"),
    ([_file("x"), _file("x/y")], "x/y", "inside a file"),
    ([_file("x/y"), _file("x")], "x", "both a file and a directory"),
    # A NUL in the header field just ends the name; a pax record can really carry one.
    ([_file("nul\x00namé")], "nul\x00namé", "NUL byte"),
    ([_file("back\\slash")], "back\\slash", "backslash"),
    ([_file("line\nbreak")], "line\nbreak", "control character"),
]


@pytest.mark.parametrize(("members", "name", "message"), UNSAFE_TAR_MEMBERS)
def test_unsafe_tar_members_are_rejected(
    tmp_path: Path, dest: Path, members: list[Member], name: str, message: str
) -> None:
    package = _write_tar(tmp_path / "p.tar.gz", members)
    with pytest.raises(ImageUnsafe, match=message) as caught:
        unpack(package, dest)
    assert repr(name) in caught.value.message
    assert not (tmp_path / "evil").exists()


UNSAFE_ZIP_MEMBERS: list[tuple[list[tuple[zipfile.ZipInfo | str, bytes]], str, str]] = [
    ([("../evil", b"x")], "../evil", "'..' component"),
    ([("/etc/evil", b"x")], "/etc/evil", "absolute path"),
    ([(_zip_info("link", stat.S_IFLNK | 0o777), b"/etc/passwd")], "link", "symbolic link"),
    ([(_zip_info("tty", stat.S_IFCHR | 0o666), b"")], "tty", "device, fifo or socket"),
    ([("disk", b"1"), ("disk", b"2")], "disk", "more than once"),
    ([("dir/", b""), ("dir", b"x")], "dir", "both a file and a directory"),
    ([("win\\path", b"x")], "win\\path", "backslash"),
]


@pytest.mark.parametrize(("members", "name", "message"), UNSAFE_ZIP_MEMBERS)
def test_unsafe_zip_members_are_rejected(
    tmp_path: Path,
    dest: Path,
    members: list[tuple[zipfile.ZipInfo | str, bytes]],
    name: str,
    message: str,
) -> None:
    package = _write_zip(tmp_path / "p.zip", members)
    with pytest.raises(ImageUnsafe, match=message) as caught:
        unpack(package, dest)
    assert repr(name) in caught.value.message


def test_a_zip_name_with_a_nul_byte_is_rejected(tmp_path: Path, dest: Path) -> None:
    package = _write_zip(tmp_path / "p.zip", [("nulXname", b"x")])
    package.write_bytes(package.read_bytes().replace(b"nulXname", b"nul\x00name"))
    with pytest.raises(ImageUnsafe, match=r"NUL byte"):
        unpack(package, dest)


def test_an_encrypted_zip_member_is_unsupported(tmp_path: Path, dest: Path) -> None:
    package = _write_zip(tmp_path / "p.zip", [("secret.img", b"x" * 100)])
    data = bytearray(package.read_bytes())
    data[data.index(b"PK\x01\x02") + 8] |= 0x1  # the central directory's "encrypted" flag
    package.write_bytes(data)
    with pytest.raises(ImageUnsupported, match=r"'secret.img' is encrypted"):
        unpack(package, dest)


def test_overlapping_zip_members_are_rejected(tmp_path: Path, dest: Path) -> None:
    package = _write_zip(tmp_path / "p.zip", [("a.img", bytes(1000)), ("b.img", bytes(1000))])
    data = bytearray(package.read_bytes())
    second_entry = data.index(b"PK\x01\x02", data.index(b"PK\x01\x02") + 1)
    struct.pack_into("<I", data, second_entry + 42, 0)  # b.img's local header is now a.img's
    package.write_bytes(data)
    with pytest.raises(ImageUnsafe, match=r"'a.img' and 'b.img' overlap"):
        unpack(package, dest)
    assert os.listdir(dest) == []


# -- limits ------------------------------------------------------------------------------


def test_the_member_count_is_capped(tmp_path: Path, dest: Path) -> None:
    package = _write_tar(tmp_path / "p.tar", [_file(f"f{i}") for i in range(20)], "")
    with pytest.raises(ImageUnsafe, match=r"more than 10 members.*'f10'"):
        unpack(package, dest, UnpackLimits(max_members=10))
    assert len(os.listdir(dest)) == 10


def test_the_member_count_of_a_zip_is_capped_before_writing(tmp_path: Path, dest: Path) -> None:
    package = _write_zip(tmp_path / "p.zip", [(f"f{i}", b"") for i in range(20)])
    with pytest.raises(ImageUnsafe, match=r"20 members, more than 10"):
        unpack(package, dest, UnpackLimits(max_members=10))
    assert os.listdir(dest) == []


def test_the_total_size_counts_bytes_across_members(tmp_path: Path, dest: Path) -> None:
    members = [_file(f"part{i}", os.urandom(MiB)) for i in range(4)]
    package = _write_tar(tmp_path / "p.tar.gz", members)
    with pytest.raises(ImageUnsafe, match=r"more than 3145728 bytes.*'part3'"):
        unpack(package, dest, UnpackLimits(max_total_bytes=3 * MiB))


def _gzip_bomb(path: Path, claimed: int, provided: int) -> Path:
    """A tar.gz whose one member claims ``claimed`` bytes of zeros and holds ``provided``.

    Built from concatenated gzip members, so it takes no time to make.
    """
    header = tarfile.TarInfo("bomb.raw")
    header.size = claimed
    zeros = gzip.compress(bytes(MiB), compresslevel=9)
    with path.open("wb") as f:
        f.write(gzip.compress(header.tobuf(tarfile.GNU_FORMAT)))
        for _ in range(provided // MiB):
            f.write(zeros)
    return path


def test_a_gzip_bomb_is_stopped_at_the_cap_quickly(tmp_path: Path, dest: Path) -> None:
    package = _gzip_bomb(tmp_path / "bomb.tar.gz", claimed=1 << 40, provided=1 << 30)
    assert package.stat().st_size < 2 * MiB
    started = time.monotonic()
    with pytest.raises(ImageUnsafe, match=r"more than 33554432 bytes.*'bomb.raw'"):
        unpack(package, dest, UnpackLimits(max_total_bytes=32 * MiB))
    assert time.monotonic() - started < 2
    assert (dest / "bomb.raw").stat().st_size <= 32 * MiB


def test_unpacking_holds_little_in_memory(tmp_path: Path, dest: Path) -> None:
    package = _gzip_bomb(tmp_path / "bomb.tar.gz", claimed=256 * MiB, provided=256 * MiB)
    tracemalloc.start()
    try:
        unpack(package, dest)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (dest / "bomb.raw").stat().st_size == 256 * MiB
    assert peak < 16 * MiB


@pytest.mark.parametrize(
    ("before", "where"), [([], "at its start"), ([_file("first")], "after member 'first'")]
)
def test_a_huge_tar_header_is_refused_before_it_is_buffered(
    tmp_path: Path, dest: Path, before: list[Member], where: str
) -> None:
    info, data = _file("disk.raw")
    info.pax_headers = {"comment": "x" * (16 * MiB)}
    package = _write_tar(tmp_path / "p.tar.gz", [*before, (info, data)])
    tracemalloc.start()
    try:
        with pytest.raises(ImageUnsafe, match=f"oversized header data {where}"):
            unpack(package, dest)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * MiB


def test_a_bzip2_bomb_is_stopped_at_the_cap(tmp_path: Path, dest: Path) -> None:
    header = tarfile.TarInfo("bomb.raw")
    header.size = 1 << 40
    zeros = bz2.compress(bytes(64 * MiB))
    package = tmp_path / "bomb.tar.bz2"
    package.write_bytes(bz2.compress(header.tobuf(tarfile.GNU_FORMAT)) + zeros * 4)
    with pytest.raises(ImageUnsafe, match=r"more than 8388608 bytes"):
        unpack(package, dest, UnpackLimits(max_total_bytes=8 * MiB))


def test_a_zip_declaring_too_much_is_refused_before_writing(tmp_path: Path, dest: Path) -> None:
    package = _write_zip(tmp_path / "p.zip", [("zeros.raw", bytes(16 * MiB))])
    assert package.stat().st_size < MiB
    with pytest.raises(ImageUnsafe, match=r"declares 16777216 bytes, more than 1048576"):
        unpack(package, dest, UnpackLimits(max_total_bytes=MiB))
    assert os.listdir(dest) == []


# -- damaged archives --------------------------------------------------------------------


def test_a_truncated_tar_gz_is_unsupported(tmp_path: Path, dest: Path) -> None:
    package = _write_tar(tmp_path / "p.tar.gz", [_file("disk.img", os.urandom(MiB))])
    package.write_bytes(package.read_bytes()[: 512 * 1024])
    with pytest.raises(ImageUnsupported, match=r"gzip stream is truncated"):
        unpack(package, dest)


def test_corrupt_gzip_data_is_unsupported(tmp_path: Path, dest: Path) -> None:
    package = _write_tar(tmp_path / "p.tar.gz", [_file("disk.img", os.urandom(MiB))])
    data = bytearray(package.read_bytes())
    data[5000:5100] = os.urandom(100)
    package.write_bytes(data)
    with pytest.raises(ImageUnsupported, match=r"gzip data is damaged"):
        unpack(package, dest)


def test_a_truncated_plain_tar_is_unsupported(tmp_path: Path, dest: Path) -> None:
    package = _write_tar(tmp_path / "p.tar", [_file("disk.img", os.urandom(MiB))], "")
    package.write_bytes(package.read_bytes()[: 512 * 1024])
    with pytest.raises(ImageUnsupported, match=r"damaged in member 'disk.img'"):
        unpack(package, dest)


def test_a_corrupt_zip_member_is_unsupported(tmp_path: Path, dest: Path) -> None:
    package = _write_zip(tmp_path / "p.zip", [("disk.img", b"abc" * 100_000)])
    data = bytearray(package.read_bytes())
    data[200:300] = os.urandom(100)
    package.write_bytes(data)
    with pytest.raises(ImageUnsupported, match=r"'disk.img' of the zip archive is damaged"):
        unpack(package, dest)
