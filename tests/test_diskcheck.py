"""Finding the disk in a package, and refusing disks that point outside it."""

from __future__ import annotations

import contextlib
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from goldclone.errors import ImageError, ImageUnsafe, ImageUnsupported
from goldclone.images.checks import (
    DiskImage,
    Package,
    check_disk,
    check_qcow2_header,
    inspect_package,
)

MiB = 1 << 20


def _qemu_img(*args: str | Path) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


def _qcow2(path: Path, *options: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _qemu_img("create", "-q", "-f", "qcow2", *options, path, "64M")
    return path


def _vmdk(path: Path, subformat: str, size: str = "8M") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _qemu_img("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", path, size)
    return path


def _descriptor(
    path: Path, *extents: str, create_type: str = "monolithicFlat", extra: str = ""
) -> Path:
    lines = [
        "# Disk DescriptorFile",
        "version=1",
        "CID=12345678",
        "parentCID=ffffffff",
        f'createType="{create_type}"',
        extra,
        "# Extent description",
        *extents,
        'ddb.adapterType = "ide"',
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _flat(path: Path, size: int = MiB) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.truncate(size)
    return path


def _mbr_disk(path: Path, size: int = 4 * MiB) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.truncate(size)
        f.seek(510)
        f.write(b"\x55\xaa")
    return path


def _patch(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


# -- qcow2 -------------------------------------------------------------------------------


def test_a_plain_qcow2_passes(tmp_path: Path) -> None:
    disk = _qcow2(tmp_path / "disk.qcow2")
    assert check_disk(disk, tmp_path) == DiskImage(disk, "qcow2")


def test_a_qcow2_v2_passes(tmp_path: Path) -> None:
    disk = _qcow2(tmp_path / "disk.qcow2", "-o", "compat=0.10")
    assert check_disk(disk, tmp_path).format == "qcow2"


def test_a_qcow2_with_a_backing_file_is_unsafe(tmp_path: Path) -> None:
    disk = _qcow2(tmp_path / "x.qcow2", "-b", "/etc/passwd", "-F", "raw")
    with pytest.raises(ImageUnsafe, match=r"x.qcow2 has a backing file"):
        check_disk(disk, tmp_path)


def test_a_qcow2_with_an_external_data_file_is_unsafe(tmp_path: Path) -> None:
    disk = _qcow2(tmp_path / "x.qcow2", "-o", f"data_file={tmp_path / 'data.raw'}")
    with pytest.raises(ImageUnsafe, match=r"x.qcow2 has an external data file"):
        check_disk(disk, tmp_path)


def test_a_data_file_extension_alone_is_unsafe(tmp_path: Path) -> None:
    disk = _qcow2(tmp_path / "x.qcow2", "-o", f"data_file={tmp_path / 'data.raw'}")
    _patch(disk, 72, struct.pack(">Q", 0))  # clear the incompatible feature bit
    with pytest.raises(ImageUnsafe, match=r"names an external data file"):
        check_disk(disk, tmp_path)


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (32, struct.pack(">I", 1), "is encrypted"),
        (72, struct.pack(">Q", 1 << 40), "unknown incompatible qcow2 features"),
        (72, struct.pack(">Q", 2), "is marked corrupt"),
        (4, struct.pack(">I", 4), "qcow2 version 4"),
        (20, struct.pack(">I", 30), "invalid cluster size"),
    ],
)
def test_qcow2_features_we_do_not_read_are_unsupported(
    tmp_path: Path, offset: int, value: bytes, message: str
) -> None:
    disk = _qcow2(tmp_path / "x.qcow2")
    _patch(disk, offset, value)
    with pytest.raises(ImageUnsupported, match=message):
        check_disk(disk, tmp_path)


def _qcow2_header(version: int) -> bytes:
    """A small valid qcow2 header, with a backing-format extension and the end marker."""
    header = struct.pack(
        ">4sIQIIQIIQQIIQ",
        b"QFI\xfb",
        version,
        0,  # backing file offset
        0,  # backing file size
        16,  # cluster bits
        64 * MiB,  # virtual size
        0,  # crypt method
        1,  # L1 size
        3 * 65536,  # L1 table offset
        65536,  # refcount table offset
        1,  # refcount table clusters
        0,  # snapshots
        0,  # snapshots offset
    )
    if version == 3:
        header += struct.pack(">QQQII", 0, 0, 0, 4, 104)
    extensions = struct.pack(">II", 0xE2792ACA, 3) + b"raw" + bytes(5) + bytes(8)
    return header + extensions + bytes(512)


@pytest.mark.parametrize("version", [2, 3])
def test_a_synthetic_qcow2_header_passes(version: int) -> None:
    check_qcow2_header(_qcow2_header(version))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_the_qcow2_checker_never_crashes_on_random_bytes(data: bytes) -> None:
    for candidate in (data, b"QFI\xfb" + data):
        with contextlib.suppress(ImageError):
            check_qcow2_header(candidate)


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from([2, 3]),
    st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255)), min_size=1, max_size=12),
    st.integers(0, 800),
)
def test_the_qcow2_checker_never_crashes_on_mutated_headers(
    version: int, flips: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(_qcow2_header(version))
    for index, value in flips:
        data[index % 160] = value
    with contextlib.suppress(ImageError):
        check_qcow2_header(bytes(data[: len(data) - cut]))


# -- VMDK --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "subformat",
    [
        "monolithicSparse",
        "monolithicFlat",
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
        "streamOptimized",
    ],
)
def test_vmdks_made_by_qemu_img_pass(tmp_path: Path, subformat: str) -> None:
    disk = _vmdk(tmp_path / "vm" / "disk.vmdk", subformat, size="3G")
    assert check_disk(disk, tmp_path) == DiskImage(disk, "vmdk")
    assert inspect_package(tmp_path) == Package(DiskImage(disk, "vmdk"), None)


def test_a_hand_written_descriptor_passes(tmp_path: Path) -> None:
    _flat(tmp_path / "flat.bin")
    disk = _descriptor(tmp_path / "disk.vmdk", 'RW 2048 FLAT "flat.bin" 0', "RW 2048 ZERO")
    assert check_disk(disk, tmp_path).format == "vmdk"


@pytest.mark.parametrize(
    ("extent", "message"),
    [
        ('RW 2048 FLAT "/etc/passwd" 0', "extent outside its folder: '/etc/passwd'"),
        ('RW 2048 FLAT "../x" 0', "extent outside its folder: '../x'"),
        ('RDONLY 2048 SPARSE "../x"', "extent outside its folder: '../x'"),
        ('  \tRW 2048 FLAT "sub/flat.bin" 0', "extent outside its folder: 'sub/flat.bin'"),
        ('RW 2048 FLAT ".." 0', "extent outside its folder: '..'"),
        ('RW 2048 VMFS "C:\\\\x.vmdk"', "extent outside its folder"),
    ],
)
def test_descriptors_pointing_outside_their_folder_are_unsafe(
    tmp_path: Path, extent: str, message: str
) -> None:
    _flat(tmp_path / "x")
    _flat(tmp_path / "vm" / "sub" / "flat.bin")
    disk = _descriptor(tmp_path / "vm" / "disk.vmdk", extent)
    with pytest.raises(ImageUnsafe, match=message):
        check_disk(disk, tmp_path)


def test_an_extent_that_is_a_symlink_out_of_the_package_is_unsafe(tmp_path: Path) -> None:
    root = tmp_path / "package"
    disk = _descriptor(root / "disk.vmdk", 'RW 2048 FLAT "flat.bin" 0')
    (root / "flat.bin").symlink_to("/etc/passwd")
    with pytest.raises(ImageUnsafe, match=r"extent 'flat.bin' lies outside the package"):
        check_disk(disk, root)


@pytest.mark.parametrize(
    ("extra", "error", "message"),
    [
        ('parentFileNameHint="/etc/passwd"', ImageUnsafe, "delta disk: it names a parent"),
        ("# parentFileNameHint is found by QEMU even in a comment", ImageUnsafe, "delta disk"),
        ("parentCID=0badf00d", ImageUnsafe, "parentCID 0badf00d"),
        ('RW 2048 FLAT "flat.bin" 0 and more', ImageUnsupported, "does not parse"),
        ("RW 2048 FLAT flat.bin 0", ImageUnsupported, "does not parse"),
        ('RW 2048 SESPARSE "flat.bin"', ImageUnsupported, "unsupported SESPARSE extent"),
        ('RW 2048 FLAT "missing.bin" 0', ImageUnsupported, "'missing.bin' is missing"),
        ('RW 2048 SPARSE "flat.bin"', ImageUnsupported, "is not a sparse VMDK extent"),
    ],
)
def test_bad_descriptors_are_rejected(
    tmp_path: Path, extra: str, error: type[ImageError], message: str
) -> None:
    _flat(tmp_path / "flat.bin")
    disk = _descriptor(tmp_path / "disk.vmdk", 'RW 2048 FLAT "flat.bin" 0', extra=extra)
    with pytest.raises(error, match=message):
        check_disk(disk, tmp_path)


@pytest.mark.parametrize("create_type", ["monolithicSparse", "seSparse", "custom", ""])
def test_descriptor_types_qemu_does_not_open_are_unsupported(
    tmp_path: Path, create_type: str
) -> None:
    _flat(tmp_path / "flat.bin")
    disk = _descriptor(tmp_path / "d.vmdk", 'RW 2048 FLAT "flat.bin" 0', create_type=create_type)
    with pytest.raises(ImageUnsupported, match=r"unsupported VMDK type"):
        check_disk(disk, tmp_path)


def test_a_flat_extent_holding_an_image_is_unsafe(tmp_path: Path) -> None:
    _qcow2(tmp_path / "flat.bin", "-b", "/etc/passwd", "-F", "raw")
    disk = _descriptor(tmp_path / "disk.vmdk", 'RW 2048 FLAT "flat.bin" 0')
    with pytest.raises(ImageUnsafe, match=r"is flat, but holds an image header"):
        check_disk(disk, tmp_path)


def test_a_sparse_extent_whose_descriptor_points_elsewhere_is_unsafe(tmp_path: Path) -> None:
    disk = _vmdk(tmp_path / "disk.vmdk", "twoGbMaxExtentSparse")
    _patch(tmp_path / "disk-s001.vmdk", 512, b'RW 2048 FLAT "other.vmdk" 0\n')
    with pytest.raises(ImageUnsafe, match=r"descriptor that points to 'other.vmdk'"):
        check_disk(disk, tmp_path)


def test_a_sparse_vmdk_naming_a_parent_is_unsafe(tmp_path: Path) -> None:
    disk = _vmdk(tmp_path / "disk.vmdk", "monolithicSparse")
    # QEMU looks for the hint right after the header, whatever descriptorOffset says.
    _patch(disk, 4, struct.pack("<IIQQQQ", 1, 3, 16384, 128, 0, 0))
    _patch(disk, 512, b'parentFileNameHint="/etc/passwd"\n')
    with pytest.raises(ImageUnsafe, match=r"delta disk"):
        check_disk(disk, tmp_path)


def test_a_sparse_vmdk_with_zero_capacity_redirects_and_is_unsafe(tmp_path: Path) -> None:
    disk = _vmdk(tmp_path / "disk.vmdk", "monolithicSparse")
    _patch(disk, 12, struct.pack("<Q", 0))
    with pytest.raises(ImageUnsafe, match=r"redirects to the extents"):
        check_disk(disk, tmp_path)


def test_the_embedded_descriptor_of_a_sparse_vmdk_is_checked(tmp_path: Path) -> None:
    disk = _vmdk(tmp_path / "disk.vmdk", "monolithicSparse")
    _patch(disk, 512, b'createType="monolithicSparse"\nRW 16384 SPARSE "/etc/passwd"\n\0')
    with pytest.raises(ImageUnsafe, match=r"extent outside its folder: '/etc/passwd'"):
        check_disk(disk, tmp_path)


def _move_header_to_footer(disk: Path, footer_capacity: int) -> None:
    """Make ``disk`` keep its grain directory offset in a footer, as VMware's exports do."""
    data = bytearray(disk.read_bytes())
    footer = bytearray(data[:512])
    struct.pack_into("<Q", footer, 12, footer_capacity)
    struct.pack_into("<Q", data, 56, 0xFFFF_FFFF_FFFF_FFFF)  # gdOffset: "see the footer"
    marker = struct.pack("<QII", 1, 0, 3).ljust(512, b"\0")
    disk.write_bytes(data + marker + footer + bytes(512))


def test_a_stream_optimized_vmdk_with_a_footer_passes(tmp_path: Path) -> None:
    disk = _vmdk(tmp_path / "disk.vmdk", "streamOptimized")
    _move_header_to_footer(disk, footer_capacity=16384)
    assert check_disk(disk, tmp_path).format == "vmdk"


def test_a_footer_that_redirects_is_unsafe(tmp_path: Path) -> None:
    disk = _vmdk(tmp_path / "disk.vmdk", "streamOptimized")
    _move_header_to_footer(disk, footer_capacity=0)
    with pytest.raises(ImageUnsafe, match=r"redirects to the extents"):
        check_disk(disk, tmp_path)


def test_a_renamed_monolithic_sparse_vmdk_passes(tmp_path: Path) -> None:
    original = _vmdk(tmp_path / "original.vmdk", "monolithicSparse")
    renamed = original.rename(tmp_path / "disk.vmdk")
    assert check_disk(renamed, tmp_path).format == "vmdk"


# -- raw ---------------------------------------------------------------------------------


def test_a_raw_disk_needs_an_mbr_or_gpt(tmp_path: Path) -> None:
    bare = _flat(tmp_path / "disk.raw", 4 * MiB)
    with pytest.raises(ImageUnsupported, match=r"disk.raw is not a qcow2, VMDK or raw"):
        check_disk(bare, tmp_path)
    assert check_disk(_mbr_disk(tmp_path / "mbr.img"), tmp_path).format == "raw"
    gpt = _flat(tmp_path / "gpt.img")
    _patch(gpt, 512, b"EFI PART")
    assert check_disk(gpt, tmp_path).format == "raw"


def test_a_disk_outside_the_root_is_unsafe(tmp_path: Path) -> None:
    outside = _mbr_disk(tmp_path / "outside.img")
    (tmp_path / "package").mkdir()
    (tmp_path / "package" / "disk.img").symlink_to(outside)
    with pytest.raises(ImageUnsafe, match=r"lies outside the package"):
        check_disk(tmp_path / "package" / "disk.img", tmp_path / "package")


# -- finding the disk --------------------------------------------------------------------


def test_one_disk_among_metadata_is_found(tmp_path: Path) -> None:
    disk = _qcow2(tmp_path / "images" / "disk.img")
    (tmp_path / "meta.json").write_text("{}")
    (tmp_path / "box.ovf").write_text("<Envelope/>")
    (tmp_path / "README.txt").write_text("hello")
    assert inspect_package(tmp_path) == Package(DiskImage(disk, "qcow2"), None)


def test_the_descriptor_is_the_disk_not_its_extents(tmp_path: Path) -> None:
    disk = _vmdk(tmp_path / "disk.vmdk", "twoGbMaxExtentFlat", size="3G")
    _patch(tmp_path / "disk-f001.vmdk", 510, b"\x55\xaa")  # the first extent starts the disk
    assert inspect_package(tmp_path).disk == DiskImage(disk, "vmdk")


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ([], "holds no qcow2, VMDK or raw"),
        (["a.qcow2", "b.qcow2"], "several disk images: a.qcow2, b.qcow2"),
    ],
)
def test_no_disk_or_several_are_unsupported(tmp_path: Path, files: list[str], message: str) -> None:
    (tmp_path / "notes.txt").write_text("not a disk")
    for name in files:
        _qcow2(tmp_path / name)
    with pytest.raises(ImageUnsupported, match=message):
        inspect_package(tmp_path)


VMX = """\
.encoding = "UTF-8"
displayName = "test vm"
ide1:0.present = "TRUE"
ide1:0.fileName = "install.iso"
scsi0:0.present = "FALSE"
scsi0:0.fileName = "old.vmdk"
scsi0:1.present = "TRUE"
scsi0:1.fileName = "{disk}"
sata0:0.present = "TRUE"
sata0:0.fileName = "data.vmdk"
"""


def test_a_vmware_folder_is_found_at_depth(tmp_path: Path) -> None:
    folder = tmp_path / "export" / "My VM.vmwarevm"
    disk = _vmdk(folder / "disk.vmdk", "monolithicSparse")
    _vmdk(folder / "data.vmdk", "monolithicSparse")
    vmx = folder / "My VM.vmx"
    vmx.write_text(VMX.format(disk="disk.vmdk"))
    assert inspect_package(tmp_path) == Package(DiskImage(disk, "vmdk"), vmx)


def test_every_disk_of_a_vmware_vm_is_checked(tmp_path: Path) -> None:
    _vmdk(tmp_path / "disk.vmdk", "monolithicSparse")
    _descriptor(tmp_path / "data.vmdk", 'RW 2048 FLAT "/etc/passwd" 0')
    (tmp_path / "vm.vmx").write_text(VMX.format(disk="disk.vmdk"))
    with pytest.raises(ImageUnsafe, match=r"data.vmdk has an extent outside its folder"):
        inspect_package(tmp_path)


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ("/etc/passwd.vmdk", ImageUnsafe, "names a disk outside its package"),
        ("../../outside.vmdk", ImageUnsafe, "lies outside the package"),
        ("../../nowhere.vmdk", ImageUnsafe, "lies outside the package"),
        ("sub/../../../outside.vmdk", ImageUnsafe, "lies outside the package"),
        ("missing.vmdk", ImageUnsupported, "missing.vmdk is missing"),
        ("fake.vmdk", ImageUnsupported, "fake.vmdk is named .vmdk, but is qcow2"),
    ],
)
def test_bad_vmware_disk_paths_are_rejected(
    tmp_path: Path, value: str, error: type[ImageError], message: str
) -> None:
    root = tmp_path / "a" / "package"
    _vmdk(tmp_path / "outside.vmdk", "monolithicSparse")
    _vmdk(root / "data.vmdk", "monolithicSparse")
    _qcow2(root / "fake.vmdk")
    (root / "vm.vmx").write_text(VMX.format(disk=value))
    with pytest.raises(error, match=message):
        inspect_package(root)


def test_whether_a_host_file_exists_does_not_show(tmp_path: Path) -> None:
    """A path out of the package gets one answer whether or not the host has that file, so
    that a package cannot probe the host's files (issue #15)."""
    root = tmp_path / "a" / "package"
    _vmdk(tmp_path / "exists.vmdk", "monolithicSparse")
    _vmdk(root / "data.vmdk", "monolithicSparse")
    answers = []
    for name in ("exists", "absent"):
        (root / "vm.vmx").write_text(VMX.format(disk=f"../../{name}.vmdk"))
        with pytest.raises(ImageError) as caught:
            inspect_package(root)
        answers.append((caught.value.code, caught.value.message.replace(name, "NAME")))
    assert answers[0] == answers[1], answers


def test_two_vmx_files_are_unsupported(tmp_path: Path) -> None:
    _vmdk(tmp_path / "disk.vmdk", "monolithicSparse")
    (tmp_path / "a.vmx").write_text(VMX.format(disk="disk.vmdk"))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "b.VMX").write_text(VMX.format(disk="../disk.vmdk"))
    with pytest.raises(ImageUnsupported, match=r"several .vmx files: a.vmx, old/b.VMX"):
        inspect_package(tmp_path)


def test_a_vmx_without_disks_is_unsupported(tmp_path: Path) -> None:
    _vmdk(tmp_path / "disk.vmdk", "monolithicSparse")
    (tmp_path / "vm.vmx").write_text('displayName = "no disks"\n')
    with pytest.raises(ImageUnsupported, match=r"vm.vmx names no VMDK disk"):
        inspect_package(tmp_path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(
            st.sampled_from(
                [
                    b'RW 2048 FLAT "flat.bin" 0',
                    b"RW 1 ZERO",
                    b"# comment",
                    b'createType="monolithicFlat"',
                    b"parentCID=ffffffff",
                    b'RDONLY 5 SPARSE "s.vmdk"',
                    b"\r",
                    b"\0",
                ]
            ),
            st.binary(max_size=40),
        ),
        max_size=12,
    )
)
def test_the_descriptor_checker_never_crashes(
    tmp_path_factory: pytest.TempPathFactory, lines: list[bytes]
) -> None:
    root = tmp_path_factory.mktemp("fuzz")
    _flat(root / "flat.bin", 4096)
    disk = root / "disk.vmdk"
    disk.write_bytes(b"# Disk DescriptorFile\n" + b"\n".join(lines))
    with contextlib.suppress(ImageError):
        check_disk(disk, root)
