"""A machine's QEMU command line, the files it names, and what is read back from one."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

from goldclone.drivers.base import MachineSpec
from goldclone.drivers.qemu.hardware import CURRENT, Hardware
from goldclone.drivers.qemu.network import Attachment
from goldclone.guest.helper import PORT_NAME

PCI_NIC, PCI_DISK, PCI_SEED, PCI_SERIAL = "0x3", "0x4", "0x5", "0x6"
NIC_ID = "nic0"
GUEST_NICE = 10
"""Every guest's QEMU runs at this nice value, behind the service, its DHCP servers and the
commands it runs, which a host full of busy guests otherwise kept waiting for the CPU."""
FW_CFG_METADATA = "opt/goldclone/metadata"
"""The fw_cfg file with the VM's ``metadata`` as JSON; a Linux guest reads it at
``/sys/firmware/qemu_fw_cfg/by_name/opt/goldclone/metadata/raw`` (module ``qemu_fw_cfg``)."""


@dataclasses.dataclass(frozen=True)
class MachineFiles:
    """A machine's folder, ``vms/<id>/``, and the files in it: its clone, its NoCloud seed, its
    ``metadata`` for fw_cfg, QEMU's sockets, pidfile and log, and the console."""

    folder: Path

    @property
    def disk(self) -> Path:
        return self.folder / "disk.qcow2"

    @property
    def qmp(self) -> Path:
        return self.folder / "qmp.sock"

    @property
    def agent(self) -> Path:
        return self.folder / "qga.sock"

    @property
    def pidfile(self) -> Path:
        return self.folder / "qemu.pid"

    @property
    def log(self) -> Path:
        return self.folder / "qemu.log"

    @property
    def seed(self) -> Path:
        return self.folder / "seed.iso"

    @property
    def metadata(self) -> Path:
        return self.folder / "metadata.json"

    @property
    def console(self) -> Path:
        return self.folder / "console.log"

    @property
    def vnc(self) -> Path:
        return self.folder / "vnc.sock"

    @property
    def exec(self) -> Path:
        """The helper's port (``guest.helper``); absent for a machine without one."""
        return self.folder / "exec.sock"


@dataclasses.dataclass(frozen=True)
class QemuCommand:
    """How this host runs QEMU: the binary, and the user it drops to (None: it stays root)."""

    binary: str
    run_as: str | None

    def line(
        self,
        spec: MachineSpec,
        nic: Attachment,
        files: MachineFiles,
        accel: str,
        drive: str,
        hardware: Hardware = CURRENT,
    ) -> list[str]:
        """The qemu command that boots ``spec``'s clone on ``hardware``, with ``accel`` and
        extra ``drive`` options for its disk.

        Every PCI device has a fixed address, so that a template's saved device state loads
        into a machine restored from it; a restored machine gets its NIC only once it runs
        (``memory.restore``), and a fresh VM generation ID, which tells its kernel to reseed its
        random number generator.
        """
        display = ["-display", "none"] if spec.headless else ["-display", f"vnc=unix:{files.vnc}"]
        generation = f",guid={uuid.uuid4()}" if spec.restore else ""
        return [
            self.binary,
            "-name", f"goldclone-{spec.machine}",
            "-accel", accel,
            "-smp", str(spec.cpus),
            "-m", str(spec.memory_mb),
            *_memory(spec, hardware),
            # a full host pauses the guest (disks.stalled) instead of failing its writes
            "-drive", f"file={files.disk},format=qcow2,if=none,id=disk0,"
                      f"werror=stop,rerror=stop{drive}",
            "-device", f"virtio-blk-pci,drive=disk0,addr={PCI_DISK}",
            "-drive", f"file={files.seed},format=raw,if=none,id=seed0,readonly=on",
            "-device", f"virtio-blk-pci,drive=seed0,addr={PCI_SEED}",
            "-fw_cfg", f"name={FW_CFG_METADATA},file={files.metadata}",
            "-netdev", f"tap,id=net0,ifname={nic.tap},script=no,downscript=no",
            *([] if spec.restore else ["-device", _nic_device(nic.mac)]),
            *display,
            # appended to, so that the oldest output can be dropped under QEMU (consoles.py)
            "-chardev", f"file,id=console0,path={files.console},append=on",
            "-serial", "chardev:console0",
            "-qmp", f"unix:{files.qmp},server=on,wait=off",
            "-device", f"virtio-serial-pci,addr={PCI_SERIAL}",
            "-chardev", f"socket,id=qga0,path={files.agent},server=on,wait=off",
            "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            *(_exec_port(files) if hardware.exec_port else []),
            "-device", f"vmgenid,id=vmgen0{generation}",
            "-pidfile", str(files.pidfile),
            *(["-incoming", "defer", "-S"] if spec.restore else []),
            *self._confinement(spec),
        ]  # fmt: skip

    def _confinement(self, spec: MachineSpec) -> list[str]:
        """seccomp, with no program of its own to start (``spawn=deny``),
        and an unprivileged user once QEMU has opened its files, tap and sockets.

        Not the user for a machine that makes a memory template or is restored from one: QEMU
        reopens its disks by path when it saves or loads a machine's state, which the
        unprivileged user cannot do in the owner-only folders (docs/design.md, known limits).
        """
        sandbox = ["-sandbox", "on,obsolete=deny,resourcecontrol=deny,spawn=deny"]
        if self.run_as is None or spec.template is not None:
            return sandbox
        return [*sandbox, "-runas", self.run_as]


def scheduling(spec: MachineSpec) -> list[str]:
    """The commands that run QEMU at ``GUEST_NICE``, and a restored machine, whose work is all
    on its CPU, under ``SCHED_BATCH``; a cold boot, whose firmware polls devices, keeps the
    default policy (docs/design.md, "The QEMU driver", with what was measured)."""
    batch = ["chrt", "--batch", "0"] if spec.restore else []
    return ["nice", "-n", str(GUEST_NICE), *batch]


def nic_options(mac: str) -> dict[str, str]:
    """The VM's NIC, as ``device_add`` takes it (``-device`` takes it as ``_nic_device``)."""
    return {"driver": "virtio-net-pci", "netdev": "net0", "id": NIC_ID, "mac": mac,
            "addr": PCI_NIC}  # fmt: skip


def option(argv: list[str], flag: str) -> str | None:
    """The value that follows ``flag`` on command line ``argv``."""
    try:
        return argv[argv.index(flag) + 1]
    except (ValueError, IndexError):
        return None


def mac_in(argv: list[str]) -> str | None:
    """The MAC of the NIC on qemu command line ``argv``."""
    for arg in argv:
        if arg.startswith("virtio-net-pci,"):
            for part in arg.split(","):
                if part.startswith("mac="):
                    return part.removeprefix("mac=")
    return None


def _nic_device(mac: str) -> str:
    options = nic_options(mac)
    return ",".join([options.pop("driver"), *(f"{k}={v}" for k, v in options.items())])


def _exec_port(files: MachineFiles) -> list[str]:
    return ["-chardev", f"socket,id=exec0,path={files.exec},server=on,wait=off",
            "-device", f"virtserialport,chardev=exec0,name={PORT_NAME}"]  # fmt: skip


def _memory(spec: MachineSpec, hardware: Hardware) -> list[str]:
    """RAM in the template's file: shared (written) while the template is made, private (copy
    on write, never written back) in a machine restored from it."""
    if spec.template is None:
        return []
    share = "off" if spec.restore else "on"
    backend = (f"memory-backend-file,id=ram0,size={spec.memory_mb}M,"
               f"mem-path={spec.template.ram},share={share}")  # fmt: skip
    return ["-object", backend, "-machine", f"{hardware.machine_type},memory-backend=ram0"]
