"""Control groups for the machines of one service: each machine's hypervisor in a group of its
own, under one parent that weighs less than the service, so that no guest starves the host or
its neighbours.

Both layouts of the kernel's interface are read: cgroup v1, a hierarchy per controller under
``/sys/fs/cgroup/<controller>`` (this project's test machines), and v2, one hierarchy at
``/sys/fs/cgroup`` whose controllers a parent hands down through ``cgroup.subtree_control``
(most hosts today). The parent is made below the service's own group in each hierarchy, read
from ``/proc/self/cgroup``, so the machines stay within whatever the host gives the service;
no systemd is needed. A machine joins its groups before its hypervisor runs: the command that
starts it (``enter``) writes its own PID into them and then executes the hypervisor.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

log = logging.getLogger(__name__)

ROOT: Final = Path("/sys/fs/cgroup")
V1_CONTROLLERS: Final = ("cpu", "cpuacct", "memory", "pids")
V2_CONTROLLERS: Final = ("cpu", "memory", "pids")
PERIOD_US: Final = 100_000
PARENT_SHARES: Final = 512
"""v1: the parent's ``cpu.shares``, half a busy task of the service at nice 0 (1024); each
machine keeps the default, 1024, so machines weigh the same among themselves."""
BUSY_WAIT: Final = 2.0
"""Seconds that removing a group waits for a process that is ending in it."""
PARENT_WEIGHT: Final = 50
"""v2: the parent's ``cpu.weight``, half of the default 100 that the service's group has."""


@dataclass(frozen=True)
class Bounds:
    """What one machine may take: ``cpus`` CPUs of time, ``memory_bytes`` of memory (more is
    an out-of-memory kill) and ``pids`` tasks."""

    cpus: int
    memory_bytes: int
    pids: int


def _write(path: Path, value: str) -> None:
    path.write_text(value + "\n")


def _own_paths(text: str) -> dict[str, str]:
    """Each hierarchy of ``/proc/self/cgroup`` text (``cpu``, ``memory``, ... for v1; ``""``
    for v2) and the service's group in it."""
    found = {}
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            found[controller] = path
    return found


@dataclass(frozen=True)
class Cgroups:
    """The groups of one service's machines: ``parents`` maps each controller's hierarchy
    (v1) or the one hierarchy (v2, key ``""``) to the parent folder."""

    version: Literal[1, 2]
    parents: dict[str, Path]

    @classmethod
    def find(cls, name: str, root: Path = ROOT, own: str | None = None) -> Cgroups | None:
        """The layout of this host, with the parent called ``name`` below the service's own
        group; ``None`` when the host offers no cgroups to use."""
        if own is None:
            own = Path("/proc/self/cgroup").read_text()
        paths = _own_paths(own)
        if (root / "cgroup.controllers").exists():  # the unified hierarchy alone: v2
            return cls(2, {"": root / paths.get("", "/").lstrip("/") / name})
        parents: dict[str, Path] = {
            c: root / c / paths[c].lstrip("/") / name
            for c in V1_CONTROLLERS
            if c in paths and (root / c / "cgroup.procs").exists()
        }
        return cls(1, parents) if parents else None

    def prepare(self) -> None:
        """Make the parent groups, weighing less than the service. Blocking."""
        if self.version == 1:
            for controller, parent in self.parents.items():
                parent.mkdir(exist_ok=True)
                if controller == "cpu":
                    _write(parent / "cpu.shares", str(PARENT_SHARES))
            return
        parent = self.parents[""]
        enable = " ".join(f"+{c}" for c in self._v2_available(parent.parent))
        # A group with processes cannot hand controllers down (cgroup v2's "no internal
        # processes" rule): the service moves into a group of its own beside the parent.
        own = parent.parent
        if own != ROOT and (own / "cgroup.procs").read_text().strip():
            service = own / "service"
            service.mkdir(exist_ok=True)
            for pid in (own / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):  # a process that has just ended
                    _write(service / "cgroup.procs", pid)
        _write(own / "cgroup.subtree_control", enable)
        parent.mkdir(exist_ok=True)
        _write(parent / "cgroup.subtree_control", enable)
        _write(parent / "cpu.weight", str(PARENT_WEIGHT))

    @staticmethod
    def _v2_available(group: Path) -> list[str]:
        offered = (group / "cgroup.controllers").read_text().split()
        return [c for c in V2_CONTROLLERS if c in offered]

    def groups(self, machine: str) -> dict[str, Path]:
        return {controller: parent / machine for controller, parent in self.parents.items()}

    def make(self, machine: str, bounds: Bounds) -> list[Path]:
        """Make ``machine``'s groups with ``bounds`` and return the files its hypervisor joins
        them through. Blocking."""
        groups = self.groups(machine)
        for group in groups.values():
            group.mkdir(exist_ok=True)
        if self.version == 1:
            self._set_v1(groups, bounds)
        else:
            self._set_v2(groups[""], bounds)
        return [group / "cgroup.procs" for group in groups.values()]

    @staticmethod
    def _set_v1(groups: dict[str, Path], bounds: Bounds) -> None:
        if "cpu" in groups:
            _write(groups["cpu"] / "cpu.cfs_period_us", str(PERIOD_US))
            _write(groups["cpu"] / "cpu.cfs_quota_us", str(bounds.cpus * PERIOD_US))
        if "memory" in groups:
            _write(groups["memory"] / "memory.limit_in_bytes", str(bounds.memory_bytes))
        if "pids" in groups:
            _write(groups["pids"] / "pids.max", str(bounds.pids))

    @staticmethod
    def _set_v2(group: Path, bounds: Bounds) -> None:
        _write(group / "cpu.max", f"{bounds.cpus * PERIOD_US} {PERIOD_US}")
        _write(group / "memory.max", str(bounds.memory_bytes))
        with contextlib.suppress(FileNotFoundError):  # no swap accounting on this kernel
            _write(group / "memory.swap.max", "0")
        _write(group / "pids.max", str(bounds.pids))

    def exists(self, machine: str) -> bool:
        return all(group.is_dir() for group in self.groups(machine).values())

    def cpu_seconds(self, machine: str) -> float | None:
        """The CPU time ``machine``'s hypervisor has used, as its group accounts it."""
        groups = self.groups(machine)
        try:
            if self.version == 1:
                return int((groups["cpuacct"] / "cpuacct.usage").read_text()) / 1e9
            for line in (groups[""] / "cpu.stat").read_text().splitlines():
                key, value = line.split()
                if key == "usage_usec":
                    return int(value) / 1e6
        except (KeyError, FileNotFoundError, ValueError):
            return None
        return None

    def memory_killed(self, machine: str) -> bool:
        """Whether the kernel killed a process of ``machine``'s group at its memory limit."""
        groups = self.groups(machine)
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        group = groups.get("memory" if self.version == 1 else "")
        if group is None:
            return False
        try:
            lines = (group / name).read_text().splitlines()
        except FileNotFoundError:
            return False
        return any(line.split()[0] == "oom_kill" and int(line.split()[1]) > 0 for line in lines)

    def remove(self, machine: str) -> None:
        """Remove ``machine``'s groups, once they hold no process; ones already gone are
        fine. Blocking."""
        for group in self.groups(machine).values():
            _remove(group)

    def machines(self) -> set[str]:
        """The machines that have groups here."""
        found: set[str] = set()
        for parent in self.parents.values():
            with contextlib.suppress(FileNotFoundError):
                found |= {p.name for p in parent.iterdir() if p.is_dir()}
        return found

    def remove_parents(self) -> None:
        """Remove the groups of machines whose processes have all ended, then the parents,
        once no machine has a group; blocking."""
        for parent in self.parents.values():
            for group in _children(parent):
                if group.is_dir() and not _holds_processes(group):
                    _remove(group)
            if not any(p.is_dir() for p in _children(parent)):
                _remove(parent)


def _holds_processes(group: Path) -> bool:
    try:
        return bool((group / "cgroup.procs").read_text().strip())
    except FileNotFoundError:
        return False


def _children(parent: Path) -> Iterable[Path]:
    try:
        return list(parent.iterdir())
    except FileNotFoundError:
        return []


def _remove(group: Path) -> None:
    """Remove ``group``, waiting up to ``BUSY_WAIT`` seconds for a process that is ending in
    it (a killed QEMU leaves its group a moment after ``/proc`` says it is gone)."""
    deadline = time.monotonic() + BUSY_WAIT
    while True:
        try:
            os.rmdir(group)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                log.warning("cgroup %s not removed: %s", group, exc.strerror)
                return
        time.sleep(0.05)


ENTER: Final = (
    'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 1; shift; n=$((n - 1)); done; '
    'exec "$@"'
)


def enter(procs: list[Path], argv: list[str]) -> list[str]:
    """A command that joins the groups of ``procs`` (their ``cgroup.procs`` files) and then
    executes ``argv``, whose processes stay in them."""
    return ["sh", "-c", ENTER, "sh", str(len(procs)), *map(str, procs), *argv]
