"""The VMware driver's parts on their own: lease files, .vmx edits, vmrun's errors, settings."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from goldclone import settings_sources
from goldclone.drivers.base import MachineSpec
from goldclone.drivers.vmware import clonevmx, vmnet_leases
from goldclone.drivers.vmware.vmrun import error_line, failure
from goldclone.errors import CommandError, VMConflict
from goldclone.guest.config import GuestConfig
from goldclone.images.vmx import VmxFile
from goldclone.settings import DEFAULT_LEASE_FILES

NOW = datetime(2026, 11, 26, 18, 30, tzinfo=UTC)
LEASES = """\
# All times in this file are in UTC (GMT), not your local timezone.
lease 192.168.150.128 {
\tstarts 4 2026/11/26 18:00:00;
\tends 4 2026/11/26 18:20:00;
\thardware ethernet 00:50:56:01:02:03;
}
lease 192.168.150.129 {
\tstarts 4 2026/11/26 18:25:40;
\tends 4 2026/11/26 18:55:40;
\thardware ethernet 00:50:56:01:02:03;
\tclient-hostname "guest";
}
lease 192.168.150.130 {
\tstarts 4 2026/11/26 18:25:40;
\tends never;
\thardware ethernet 0:c:29:a:b:c;
}
lease 192.168.150.131 {
\tstarts 4 2026/11/26 18:25:40;
\tends 4 2026/11/26 18:10:00;
\thardware ethernet 00:50:56:0f:0f:0f;
}
lease not-an-address {
\thardware ethernet 00:50:56:0e:0e:0e;
}
lease 192.168.150.132 {
"""


def test_leases_in_force_by_mac() -> None:
    assert vmnet_leases.parse(LEASES, NOW) == {
        "00:50:56:01:02:03": "192.168.150.129",
        "00:0c:29:0a:0b:0c": "192.168.150.130",
    }


def test_lease_lookup_reads_every_file_and_skips_missing_ones(tmp_path: Path) -> None:
    vmnet1 = tmp_path / "vmnet1.leases"
    vmnet1.write_text(
        "lease 192.168.151.10 {\n  ends never;\n  hardware ethernet 00:50:56:3F:FF:FF;\n}\n"
    )
    files = [tmp_path / "missing.leases", vmnet1]
    assert vmnet_leases.lookup(files, "00:50:56:3f:ff:ff") == "192.168.151.10"
    assert vmnet_leases.lookup(files, "00:50:56:00:00:01") is None


def test_default_lease_files_are_vmnet_dhcpds() -> None:
    assert Path("/var/db/vmware/vmnet-dhcpd-vmnet8.leases") in DEFAULT_LEASE_FILES
    assert Path("/etc/vmware/vmnet8/dhcpd/dhcpd.leases") in DEFAULT_LEASE_FILES


def test_fresh_macs_are_in_the_static_range_and_not_in_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for _ in range(200):
        mac = clonevmx.fresh_mac(set())
        assert mac.startswith("00:50:56:") and int(mac[9:11], 16) <= 0x3F
    draws = iter([0x3F_FF_FF, 0x3F_FF_FF, 0x00_00_07])
    monkeypatch.setattr(clonevmx.secrets, "randbelow", lambda _: next(draws))
    assert clonevmx.fresh_mac({"00:50:56:3F:FF:FF"}) == "00:50:56:00:00:07"


def test_set_nic_leaves_exactly_one_nic() -> None:
    vmx = VmxFile.parse(
        b'ethernet0.present = "TRUE"\nethernet0.virtualDev = "vmxnet3"\n'
        b'ethernet0.generatedAddress = "00:0c:29:11:22:33"\nEthernet1.present = "TRUE"\n'
        b'ethernet1.connectionType = "custom"\nethernet1.vnet = "/dev/vmnet9"\n'
    )
    clonevmx.set_nic(vmx, "hostonly", "00:50:56:00:00:01")
    assert vmx.to_bytes() == (
        b'ethernet0.present = "TRUE"\nethernet0.connectionType = "hostonly"\n'
        b'ethernet0.virtualDev = "vmxnet3"\nethernet0.addressType = "static"\n'
        b'ethernet0.address = "00:50:56:00:00:01"\nethernet0.startConnected = "TRUE"\n'
    )
    assert clonevmx.nic_mac(vmx) == "00:50:56:00:00:01"


def test_set_nic_replaces_an_unknown_device() -> None:
    vmx = VmxFile.parse(b'ethernet0.virtualDev = "evil|22"\n')
    clonevmx.set_nic(vmx, "nat", "00:50:56:00:00:02")
    assert vmx.get("ethernet0.virtualDev") == "e1000"


def test_set_machine() -> None:
    vmx = VmxFile.parse(
        b'numvcpus = "8"\ncpuid.coresPerSocket = "4"\nmemsize = "8192"\n'
        b'guestinfo.userdata = "I2Nsb3VkLWNvbmZpZw=="\nGuestInfo.coordinator = "evil"\n'
    )
    guest = GuestConfig(
        "282ee68a", "builder-1", ("ssh-ed25519 AAAA me",), "#!/bin/sh\n", {"token": 'a "b"|c'}
    )
    clonevmx.set_machine(vmx, MachineSpec("282ee68a", 2, 1024, True, guest))
    assert vmx.get("numvcpus") == "2" and vmx.get("memsize") == "1024"
    assert "cpuid.coresPerSocket" not in vmx
    assert vmx.get("displayName") == "goldclone-282ee68a"
    assert vmx.get("guestinfo.goldclone.id") == "282ee68a"
    # what cloud-init's VMware datasource reads, and one key per metadata entry
    metadata = json.loads(base64.b64decode(vmx.get("guestinfo.metadata") or ""))
    assert metadata["local-hostname"] == "builder-1"
    assert metadata["public-keys"] == ["ssh-ed25519 AAAA me"]
    assert vmx.get("guestinfo.metadata.encoding") == "base64"
    assert base64.b64decode(vmx.get("guestinfo.userdata") or "") == b"#!/bin/sh\n"
    assert vmx.get("guestinfo.token") == 'a "b"|c'
    assert "guestinfo.coordinator" not in vmx  # the package's own guestinfo goes
    assert vmx.get("msg.autoAnswer") == "TRUE"


def test_the_template_uses_the_gold_disks_in_place(tmp_path: Path) -> None:
    gold = tmp_path / "gold" / "content" / "vm.vmwarevm"
    gold.mkdir(parents=True)
    (gold / "vm.vmx").write_bytes(
        b'scsi0:0.fileName = "disk.vmdk"\nsata0:1.fileName = "../extra/more.vmdk"\n'
        b'sata0:1.present = "TRUE"\nannotation = "a=b"\nnvram = "vm.nvram"\n'
    )
    vmx = clonevmx.template(gold / "vm.vmx", tmp_path / "gold")
    assert vmx.get("scsi0:0.fileName") == str(gold / "disk.vmdk")
    assert vmx.get("sata0:1.fileName") == str(gold.parent / "extra" / "more.vmdk")
    assert vmx.get("annotation") == "a=b"
    assert vmx.get("nvram") == "vm.nvram"


def test_the_template_names_no_file_outside_the_gold_image(tmp_path: Path) -> None:
    """VMware opens the template before any clone is confined, so the template is confined
    to its gold image first (issue #15)."""
    gold = tmp_path / "gold" / "content"
    gold.mkdir(parents=True)
    (gold / "vm.vmx").write_bytes(
        b'scsi0:0.fileName = "disk.vmdk"\n'
        b'ide1:0.present = "TRUE"\nide1:0.deviceType = "cdrom-image"\n'
        b'ide1:0.fileName = "/etc/shadow"\nsata0:2.fileName = "../../../outside.vmdk"\n'
        b'floppy0.fileName = "/dev/fd0"\nserial0.fileName = "/tmp/x"\nnvram = "/etc/nvram"\n'
        b'sched.swap.dir = "/elsewhere"\nsharedFolder0.hostPath = "/"\n'
    )
    vmx = clonevmx.template(gold / "vm.vmx", tmp_path / "gold")
    named = {key: vmx.get(key) for key in vmx if "/" in (vmx.get(key) or "")}
    assert named == {"scsi0:0.fileName": str(gold / "disk.vmdk")}
    for device in ("ide1:0", "sata0:2", "floppy0", "serial0"):
        assert vmx.get(f"{device}.present") == "FALSE", device


def test_confine_keeps_local_disks_and_unplugs_the_rest() -> None:
    vmx = VmxFile.parse(
        b'scsi0:0.present = "TRUE"\nscsi0:0.fileName = "vm-cl1.vmdk"\n'
        b'scsi0:1.fileName = "/Users/someone/secret.vmdk"\n'
        b'sata0:0.deviceType = "cdrom-raw"\nsata0:0.fileName = "auto detect"\n'
        b'nvme0:0.deviceType = "rawDisk"\nnvme0:0.fileName = "disk.vmdk"\n'
        b'serial0.fileType = "pipe"\nserial0.fileName = "/tmp/pipe"\n'
        b'sharedFolder0.hostPath = "/"\nnvram = "vm.nvram"\nextendedConfigFile = "/x.vmxf"\n'
        b'annotation = "see /etc/motd"\n'
    )
    clonevmx.confine(vmx)
    assert vmx.get("scsi0:0.fileName") == "vm-cl1.vmdk"
    assert vmx.get("nvram") == "vm.nvram"
    assert vmx.get("annotation") == "see /etc/motd"
    for device in ("scsi0:1", "sata0:0", "nvme0:0", "serial0"):
        assert vmx.get(f"{device}.present") == "FALSE"
        assert f"{device}.fileName" not in vmx
    assert "sharedFolder0.hostPath" not in vmx and "extendedConfigFile" not in vmx
    assert vmx.get("isolation.tools.hgfs.disable") == "TRUE"


_SLOTS = st.sampled_from(
    ["scsi0:0", "scsi0:1", "sata0:0", "ide1:0", "nvme0:0", "floppy0", "serial1", "parallel0"]
)
_SETTINGS = st.sampled_from(["fileName", "FILENAME", "deviceType", "present", "fileType"])
_VALUES = st.sampled_from(
    ["disk.vmdk", "/etc/passwd", "..\\up.vmdk", "../up.vmdk", "auto detect", "TRUE", "FALSE",
     "cdrom-image", "rawDisk", "disk", "scsi-hardDisk", "x.iso", "", "sub/dir.vmdk"]
)  # fmt: skip
_OTHER_KEYS = st.sampled_from(
    ["nvram", "workingDir", "log.fileName", "extendedConfigFile", "sharedFolder0.hostPath",
     "usb.autoConnect.device0", "displayName", "annotation"]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(_SLOTS, _SETTINGS, _VALUES), max_size=20),
    st.lists(st.tuples(_OTHER_KEYS, _VALUES), max_size=8),
)
def test_a_confined_vmx_names_no_file_outside_its_folder(
    devices: list[tuple[str, str, str]], others: list[tuple[str, str]]
) -> None:
    lines = [f'{slot}.{name} = "{value}"' for slot, name, value in devices]
    lines += [f'{key} = "{value}"' for key, value in others]
    vmx = VmxFile.parse("\n".join(lines).encode())
    clonevmx.confine(vmx)
    for key in vmx:
        value = vmx.get(key) or ""
        lower = key.lower()
        if lower.endswith(("filename", "file")) or lower in ("nvram", "workingdir"):
            assert "/" not in value and "\\" not in value and value not in (".", ".."), key
        assert not lower.startswith(("sharedfolder", "usb.autoconnect")), key
    for slot in {slot for slot, _, _ in devices}:
        if (vmx.get(f"{slot}.present") or "TRUE").upper() != "FALSE":
            assert (vmx.get(f"{slot}.fileName") or "").lower().endswith(".vmdk"), slot
            assert slot[:4] in ("scsi", "sata", "ide1", "nvme"), slot
    assert VmxFile.parse(vmx.to_bytes()).to_bytes() == vmx.to_bytes()


def test_vmrun_errors_are_read_from_stdout_after_log_lines() -> None:
    out = "2013-09-07T15:26:59.560| ServiceImpl_Opener: PID 4119\nError: Cannot connect\n"
    assert error_line(out, "") == "Error: Cannot connect"
    assert error_line("", "some stderr\n") == "some stderr"
    error = failure(["/opt/vmrun", "-T", "ws", "start", "/d/vm.vmx", "nogui"], 255, out, "")
    assert isinstance(error, CommandError)
    assert (error.returncode, error.stderr_line) == (255, "Error: Cannot connect")
    assert error.argv[3:] == ["start", "/d/vm.vmx", "nogui"]


@pytest.mark.parametrize(
    "line",
    [
        "Error: The file is already in use",
        "Error: The virtual machine is in use",
        "Error: Failed to lock the file",
    ],
)
def test_vmrun_lock_errors_are_conflicts_without_paths(line: str) -> None:
    argv = ["/opt/vmrun", "-T", "fusion", "deleteVM", "/data/vms/x/x.vmx"]
    error = failure(argv, 255, f"{line}: /data/vms/x/x.vmx\n", "")
    assert isinstance(error, VMConflict)
    assert error.status == 409 and error.code == "vm-conflict"
    assert "deleteVM" in error.message and "/data" not in error.message


def test_settings_from_the_environment() -> None:
    s = settings_sources.from_env(
        {
            "GOLDCLONE_DRIVER": "vmware",
            "GOLDCLONE_VMRUN": "/opt/vmrun",
            "GOLDCLONE_VMWARE_TYPE": "fusion",
            "GOLDCLONE_VMWARE_GUI_FALLBACK": "false",
            "GOLDCLONE_VMWARE_LEASE_FILES": "/a.leases:/b.leases",
        }
    )
    assert s.driver == "vmware"
    assert (s.vmware.vmrun, s.vmware.host_type, s.vmware.gui_fallback) == (
        "/opt/vmrun", "fusion", False,
    )  # fmt: skip
    assert s.vmware.lease_files == (Path("/a.leases"), Path("/b.leases"))
    assert settings_sources.from_env({}).driver == "qemu"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("GOLDCLONE_DRIVER", "virtualbox"),
        ("GOLDCLONE_VMWARE_TYPE", "esx"),
        ("GOLDCLONE_VMWARE_GUI_FALLBACK", "maybe"),
    ],
)
def test_bad_settings_name_their_variable(variable: str, value: str) -> None:
    with pytest.raises(ValueError, match=variable):
        settings_sources.from_env({variable: value})
