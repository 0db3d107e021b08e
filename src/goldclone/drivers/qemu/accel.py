"""Choosing the accelerator: KVM only where a bounded probe shows that it really runs guests.

``/dev/kvm`` can exist on a host whose CPU has no virtualisation extensions (nested guests
without them), and a KVM guest then hangs. So both the CPU flags and a real run are checked:
a 64 KiB firmware whose reset vector writes to QEMU's ``isa-debug-exit`` port, which ends
QEMU with a status of our choosing within milliseconds when the guest really executes.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from goldclone.errors import CommandError
from goldclone.host.commands import run

log = logging.getLogger(__name__)

KVM_DEVICE = Path("/dev/kvm")
_RESET_VECTOR = 0xFFF0
_EXIT_PORT = 0xF4
_PROBE_VALUE = 0x2A
# isa-debug-exit ends QEMU with status (value << 1) | 1, which no QEMU error exit can mimic
_PROBE_EXIT_STATUS = (_PROBE_VALUE << 1) | 1
# mov al, VALUE; out PORT, al; hlt
_PROBE_CODE = bytes([0xB0, _PROBE_VALUE, 0xE6, _EXIT_PORT, 0xF4])


def _cpu_has_virtualisation() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f" {flag}" in flags for flag in ("vmx", "svm"))


async def kvm_works(qemu_binary: str) -> bool:
    """Whether a KVM guest runs to completion on this host."""
    return await kvm_problem(qemu_binary) is None


async def kvm_problem(qemu_binary: str) -> str | None:
    """Why KVM does not run guests on this host, or ``None`` when a probe guest ran under it."""
    if not KVM_DEVICE.exists():
        return f"there is no {KVM_DEVICE}: no kvm module, or a VM without nested virtualisation"
    if not _cpu_has_virtualisation():
        return f"{KVM_DEVICE} exists, but the CPU shows no vmx or svm flag (KVM guests hang then)"
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return f"this user cannot open {KVM_DEVICE} (it is for root and the kvm group)"
    if not await runs_guest(qemu_binary, "kvm"):
        return "a probe guest did not run to its end under KVM"
    return None


async def runs_guest(qemu_binary: str, accel: str, timeout: float = 5.0) -> bool:
    """Whether QEMU with ``accel`` runs the probe firmware to its end within ``timeout``."""
    firmware = bytearray(64 * 1024)
    firmware[_RESET_VECTOR : _RESET_VECTOR + len(_PROBE_CODE)] = _PROBE_CODE
    with tempfile.NamedTemporaryFile(suffix=".bin") as bios:
        bios.write(firmware)
        bios.flush()
        try:
            code, _, _ = await run(
                qemu_binary,
                "-accel", accel, "-machine", "pc", "-nodefaults", "-no-user-config",
                "-display", "none", "-bios", bios.name,
                "-device", f"isa-debug-exit,iobase={_EXIT_PORT:#x},iosize=0x04",
                timeout=timeout,
                check=False,
            )  # fmt: skip
        except CommandError as exc:
            log.info("%s probe failed: %s", accel, exc)
            return False
    return code == _PROBE_EXIT_STATUS


async def choose_accel(setting: str, qemu_binary: str) -> str:
    """Resolve the ``accel`` setting (``auto``, ``kvm`` or ``tcg``) to what QEMU is given."""
    if setting != "auto":
        return setting
    accel = "kvm" if await kvm_works(qemu_binary) else "tcg"
    log.info("using the %s accelerator", accel)
    return accel
