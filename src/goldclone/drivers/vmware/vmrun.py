"""VMware's ``vmrun`` CLI: finding it, calling it through ``commands.run``, reading its errors.

vmrun reports a failure as a line ``Error: ...`` on **stdout** (stderr stays empty), possibly
after log lines, and exits non-zero (255). A lock held by another VMware process ("The file is
already in use", "The virtual machine is in use") becomes ``VMConflict``; any other failure a
``CommandError`` that carries the command and vmrun's ``Error:`` line.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Final

from goldclone.errors import CommandError, DriverUnavailable, VMConflict
from goldclone.host.commands import run

log = logging.getLogger(__name__)

KNOWN_PATHS: Final = (
    "/Applications/VMware Fusion.app/Contents/Public/vmrun",
    "/Applications/VMware Fusion.app/Contents/Library/vmrun",
    "/usr/bin/vmrun",
    "/usr/local/bin/vmrun",
)
_LOCKED = re.compile(r"\bin use\b|\blocked\b|failed to lock|lock the file", re.IGNORECASE)
_RUNNING_HEADER = "Total running VMs:"
_SNAPSHOTS_HEADER = "Total snapshots:"


class Vmrun:
    """Runs ``vmrun -T <host_type> COMMAND ...`` with a timeout; returns its stdout."""

    def __init__(self, path: str, host_type: str, timeout: float) -> None:
        self.path = path
        self.host_type = host_type
        self.timeout = timeout

    async def __call__(self, command: str, *args: str, timeout: float | None = None) -> str:
        """Run ``command``; raises ``VMConflict`` for a lock, ``CommandError`` (or
        ``CommandTimeout``) for any other failure."""
        argv = [self.path, "-T", self.host_type, command, *args]
        code, out, err = await run(*argv, timeout=timeout or self.timeout, check=False)
        if code != 0:
            raise failure(argv, code, out, err)
        return out

    async def running(self) -> set[str]:
        """The ``.vmx`` paths of the running VMs (``vmrun list``), each resolved."""
        out = await self("list")
        lines = [line.strip() for line in out.splitlines() if line.strip()]
        if not lines or not lines[0].startswith(_RUNNING_HEADER):
            raise CommandError([self.path, "list"], 0, f"unexpected output: {out[:200]!r}")
        return {os.path.realpath(line) for line in lines[1:]}

    async def snapshots(self, vmx: Path) -> list[str]:
        """The names of ``vmx``'s snapshots (``vmrun listSnapshots``)."""
        out = await self("listSnapshots", str(vmx))
        lines = [line.strip() for line in out.splitlines() if line.strip()]
        return [line for line in lines if not line.startswith(_SNAPSHOTS_HEADER)]


def failure(argv: list[str], code: int, out: str, err: str) -> CommandError | VMConflict:
    """The typed error for a vmrun call that exited with ``code``."""
    line = error_line(out, err)
    if _LOCKED.search(line):
        log.warning("vmrun %s: %s", " ".join(argv[3:]), line)
        return VMConflict(
            f"vmrun {argv[3]}: {_without_paths(line, argv)}: VMware holds a lock on the VM; "
            "retry later"
        )
    return CommandError(argv, code, line)


def error_line(out: str, err: str) -> str:
    """vmrun's ``Error:`` line, else the first non-empty line of stderr or stdout."""
    lines = [line.strip() for line in (out + "\n" + err).splitlines() if line.strip()]
    return next((line for line in lines if line.startswith("Error:")), lines[0] if lines else "")


def _without_paths(line: str, argv: list[str]) -> str:
    """``line`` with the paths of ``argv`` cut to their file names, for a client to read."""
    for arg in sorted(argv[3:], key=len, reverse=True):
        if arg.startswith("/"):
            line = line.replace(arg, Path(arg).name)
    return line


def locate(configured: str | None) -> str:
    """The vmrun to use: ``configured`` (a path or a command name), else ``vmrun`` on PATH,
    else the first of ``KNOWN_PATHS`` that exists. Raises ``DriverUnavailable``."""
    if configured:
        found = shutil.which(configured)
        if found is None:
            raise DriverUnavailable(
                f"GOLDCLONE_VMRUN={configured!r} is not an executable vmrun; fix the path, "
                "or unset it to look on PATH and in the usual install places"
            )
        return found
    found = shutil.which("vmrun") or next(
        (path for path in KNOWN_PATHS if os.access(path, os.X_OK)), None
    )
    if found is None:
        raise DriverUnavailable(
            "the vmware driver needs VMware's vmrun, which is neither on PATH nor in "
            f"{', '.join(KNOWN_PATHS)}; install VMware Fusion or Workstation, or set "
            "GOLDCLONE_VMRUN to the path of vmrun"
        )
    return found


def host_type(configured: str, vmrun_path: str) -> str:
    """vmrun's ``-T``: ``configured`` unless it is ``auto``."""
    if configured != "auto":
        return configured
    return "fusion" if sys.platform == "darwin" or "Fusion.app" in vmrun_path else "ws"


async def check(vmrun: Vmrun) -> None:
    """Raise ``DriverUnavailable`` unless ``vmrun list`` works."""
    try:
        await vmrun.running()
    except (CommandError, VMConflict) as exc:
        raise DriverUnavailable(
            f"{vmrun.path} -T {vmrun.host_type} list does not work: {exc.message}"
        ) from exc
