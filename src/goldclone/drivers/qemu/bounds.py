"""What one QEMU may take of its host: its cgroups (``host.cgroups``), made before it starts
and removed after it ends, the size of TCG's translation cache, which is most of what QEMU
itself takes beyond the guest's RAM, and the rate of its disk, which QEMU's block layer holds
to (cgroup v1 cannot throttle writes that go through the page cache, and IO weights need BFQ).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from goldclone.host.cgroups import Bounds, Cgroups, enter

log = logging.getLogger(__name__)

MB = 1024 * 1024
PIDS = 1024
"""Tasks one QEMU may have: its threads (one per vCPU, I/O and RCU helpers) are a few dozen."""


@dataclass(frozen=True)
class DiskRate:
    """What one machine's disk may do, reads and writes together: ``mbps`` megabytes and
    ``iops`` operations a second (0: no limit)."""

    mbps: int = 0
    iops: int = 0

    def drive_options(self) -> str:
        """The ``-drive`` options that hold a disk to this rate (empty: none)."""
        options = []
        if self.mbps:
            options.append(f",throttling.bps-total={self.mbps * MB}")
        if self.iops:
            options.append(f",throttling.iops-total={self.iops}")
        return "".join(options)


UNLIMITED = DiskRate()


def group_name(data_dir: Path) -> str:
    """The name of the parent cgroup of the machines of the service of ``data_dir``."""
    return "goldclone-" + hashlib.sha256(str(data_dir.absolute()).encode()).hexdigest()[:16]


class MachineBounds:
    """The cgroups of one service's QEMUs, named by a hash of its data dir, with a memory
    limit of the guest's RAM, ``tcg_cache_mb`` (under TCG) and ``overhead_mb``."""

    def __init__(
        self, data_dir: Path, overhead_mb: int, tcg_cache_mb: int, disk: DiskRate = UNLIMITED
    ) -> None:
        self.name = group_name(data_dir)
        self.disk = disk
        self.overhead_mb = overhead_mb
        self.tcg_cache_mb = tcg_cache_mb
        self.cgroups: Cgroups | None = None
        self.problem: str | None = "not prepared yet"

    async def prepare(self) -> None:
        """Find this host's cgroups and make the parents; without usable ones, QEMUs run
        unbounded and ``problem`` says why (``/readyz`` reports it)."""
        try:
            found = await asyncio.to_thread(Cgroups.find, self.name)
            if found is None:
                self.problem = "this host has no cgroup hierarchy to use"
            else:
                await asyncio.to_thread(found.prepare)
                self.cgroups, self.problem = found, None
        except OSError as exc:
            self.problem = f"cannot make cgroups: {exc.strerror or exc}"
        if self.problem is not None:
            log.error("VMs run without CPU, memory and task bounds: %s", self.problem)

    def accel(self, accel: str) -> str:
        """QEMU's ``-accel`` option, with the translation cache pinned under TCG (QEMU 7.2
        otherwise sizes it up to 1 GiB)."""
        return f"tcg,tb-size={self.tcg_cache_mb}" if accel == "tcg" else accel

    def memory_limit_mb(self, memory_mb: int, accel: str) -> int:
        return memory_mb + self.overhead_mb + (self.tcg_cache_mb if accel == "tcg" else 0)

    async def launch(self, machine: str, cpus: int, limit_mb: int, argv: list[str]) -> list[str]:
        """``argv``, made to start ``machine``'s QEMU inside its new groups."""
        if self.cgroups is None:
            return argv
        bounds = Bounds(cpus=cpus, memory_bytes=limit_mb * MB, pids=PIDS)
        procs = await asyncio.to_thread(self.cgroups.make, machine, bounds)
        return enter(procs, argv)

    async def adopt(self, machine: str, pid: int, cpus: int, limit_mb: int) -> None:
        """Put the running QEMU ``pid`` of ``machine`` in its groups, if a release before
        cgroups started it."""
        if self.cgroups is None or await asyncio.to_thread(self.cgroups.exists, machine):
            return
        bounds = Bounds(cpus=cpus, memory_bytes=limit_mb * MB, pids=PIDS)
        procs = await asyncio.to_thread(self.cgroups.make, machine, bounds)
        for path in procs:
            await asyncio.to_thread(path.write_text, f"{pid}\n")

    def exit_reason(self, machine: str) -> str | None:
        """Why ``machine``'s QEMU ended, when its groups know: the kernel's kill at the
        memory limit."""
        if self.cgroups is None or not self.cgroups.memory_killed(machine):
            return None
        return "the kernel killed its QEMU at the memory limit of its cgroup (the guest's RAM, " \
               "and what QEMU itself may take beyond it)"  # fmt: skip

    def cpu_seconds(self, machine: str) -> float | None:
        return self.cgroups.cpu_seconds(machine) if self.cgroups is not None else None

    async def release(self, machine: str) -> None:
        """Remove ``machine``'s groups; its QEMU has ended."""
        if self.cgroups is not None:
            await asyncio.to_thread(self.cgroups.remove, machine)

    def machines(self) -> set[str]:
        """The machines that have groups."""
        return self.cgroups.machines() if self.cgroups is not None else set()

    async def close(self) -> None:
        """Remove the parents, if no machine has groups left."""
        if self.cgroups is not None:
            await asyncio.to_thread(self.cgroups.remove_parents)
