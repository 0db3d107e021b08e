"""A machine's disk: its overlay on the gold or template disk, how far the overlays can still
grow on a full host, a machine that QEMU paused because its disk could not be written
(``werror=stop``) and its resumption, and a disk flattened into an image of its own.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from goldclone.drivers.qemu.qmp import qmp_execute
from goldclone.errors import CloneFailed, CommandError, QMPError
from goldclone.host.commands import run
from goldclone.host.files import write_atomically

QCOW2_MAGIC = b"QFI\xfb"
STATUS_TIMEOUT = 2.0


def growth(overlay: Path) -> int:
    """Bytes that qcow2 file ``overlay`` can still grow by before it holds its whole virtual
    disk (its metadata aside): the virtual size less what it takes on disk now. 0 for a file
    that is gone or not qcow2. Blocking."""
    try:
        with overlay.open("rb") as f:
            header = f.read(32)
            blocks = overlay.stat().st_blocks
    except FileNotFoundError:
        return 0
    if len(header) < 32 or header[:4] != QCOW2_MAGIC:
        return 0
    virtual = int.from_bytes(header[24:32], "big")
    return max(0, virtual - blocks * 512)


def growth_of_all(vms_dir: Path) -> int:
    """What every machine's disk overlay in ``vms_dir`` can still grow by. Blocking."""
    return sum(growth(disk) for disk in vms_dir.glob("*/disk.qcow2"))


async def stalled(qmp: Path) -> bool:
    """Whether the machine behind QMP socket ``qmp`` is paused because its disk could not be
    written or read; a machine that does not answer is not counted as stalled."""
    try:
        status = await qmp_execute(qmp, "query-status", timeout=STATUS_TIMEOUT)
    except (QMPError, OSError):
        return False
    return isinstance(status, dict) and status.get("status") == "io-error"


async def resume(qmp: Path) -> None:
    """Let a stalled machine run again; its failed writes are retried."""
    await qmp_execute(qmp, "cont", timeout=STATUS_TIMEOUT)


async def flatten(disk: Path, dest: Path) -> None:
    """``disk`` with its backing chain merged into one qcow2 at ``dest`` (its unused clusters
    left out)."""
    try:
        await run("qemu-img", "convert", "-q", "-O", "qcow2", str(disk), str(dest), timeout=3600)
    except CommandError as exc:
        raise CloneFailed(f"could not flatten the VM's disk: {exc.message}") from exc


async def overlay(base: Path, base_format: str, dest: Path, size: int | None = None) -> None:
    """A qcow2 overlay at ``dest`` on ``base``, of ``size`` bytes (more than ``base``'s: the
    guest sees a larger disk, whose end reads as zeros) or of ``base``'s size."""
    args = [] if size is None else [str(size)]
    try:
        await run(
            "qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", base_format,
            str(dest), *args,
            timeout=30,
        )  # fmt: skip
    except CommandError as exc:
        raise CloneFailed(f"could not make a disk overlay: {exc.message}") from exc


def copy_if_present(source: Path, target: Path) -> bool:
    """Copy ``source`` to ``target`` (0600, never half-written); whether there was a
    ``source``."""
    try:
        src = source.open("rb")
    except FileNotFoundError:
        return False
    with src:
        write_atomically(target, lambda out: shutil.copyfileobj(src, out), 0o600)
    return True
