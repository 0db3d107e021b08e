"""Reading and ending the processes goldclone started, found by PID through ``/proc``.

A zombie counts as gone: its parent (often not us, for daemonized programs) may take seconds
to reap it, and ``kill -0`` would still call it alive.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from goldclone.polling import until

POLL = 0.05


def state(pid: int) -> str | None:
    """The one-letter state of process ``pid`` (``R``, ``S``, ``T``, ``Z`` ...), or ``None``."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line.split()[1]
    except OSError:
        return None
    return None


def alive(pid: int) -> bool:
    return state(pid) not in (None, "Z", "X")


def argv(pid: int) -> list[str] | None:
    """The command line of process ``pid``, unless it is gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if not alive(pid):
        return None
    return [arg.decode(errors="replace") for arg in raw.split(b"\0")[:-1]] or None


async def wait_exit(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``pid`` to be gone; return whether it is."""
    try:
        await until(lambda: not alive(pid), interval=POLL, timeout=timeout)
    except TimeoutError:
        return False
    return True


async def end(pid: int, signals: tuple[signal.Signals, ...], grace: float) -> bool:
    """Send each of ``signals`` in turn, giving ``pid`` ``grace`` seconds after each to exit.

    Returns whether it is gone. SIGKILL ends a stopped (SIGSTOPped) process too.
    """
    for sig in signals:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        if await wait_exit(pid, grace):
            return True
    return False
