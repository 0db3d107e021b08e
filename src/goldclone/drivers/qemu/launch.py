"""Starting a QEMU so that it outlives the service and its last words are kept.

QEMU's own ``-daemonize`` points its stderr at ``/dev/null`` and leaves its exit status to init:
a QEMU that failed said nothing. Instead a small shell, in a session of its own (so that a
Ctrl-C of the service reaches no guest), runs QEMU with its output appended to ``qemu.log`` in
the VM's folder, waits for it, and appends how it ended. The shell is named ``WAITER``, so that
a scan for a machine's QEMU by its command line (which the shell carries too) can leave it out.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

from goldclone.errors import BootFailed
from goldclone.host import processes
from goldclone.host.commands import run
from goldclone.host.tails import read_end
from goldclone.polling import until

WAITER = "goldclone-qemu-waiter"
ENDED = "goldclone: qemu ended with status "
_LAUNCH = (
    'log=$1; shift; ( "$@" </dev/null >>"$log" 2>&1; echo "' + ENDED + '$?" >>"$log" ) '
    "</dev/null >/dev/null 2>&1 &"
)
TAIL_BYTES = 4096
"""What is read of the end of a ``qemu.log`` for its last words."""


async def launch(argv: list[str], log: Path) -> None:
    """Start ``argv`` (a QEMU, perhaps behind wrappers that ``exec`` it) in the background,
    its output and its end appended to ``log``."""
    await run("setsid", "sh", "-c", _LAUNCH, WAITER, str(log), *argv, timeout=30)


def is_waiter(argv: list[str]) -> bool:
    """Whether ``argv`` is the command line of a QEMU's waiting shell."""
    return len(argv) > 3 and argv[3] == WAITER


async def started(pidfile: Path, sockets: list[Path], log: Path, timeout: float) -> None:
    """Return once QEMU has written ``pidfile`` and made ``sockets``; raise ``BootFailed``
    with its last words if it ends first, or does neither within ``timeout`` seconds."""

    def ready() -> bool:
        if (how := ending(log)) is not None:
            raise BootFailed(f"qemu did not start: {how.words}")
        return pidfile.exists() and all(socket.exists() for socket in sockets)

    try:
        await until(ready, interval=processes.POLL, timeout=timeout)
    except TimeoutError:
        raise BootFailed(f"qemu did not start within {timeout:g} s") from None


@dataclass(frozen=True)
class Ending:
    """How a QEMU ended: ``clean`` (status 0: the guest powered off, or QEMU was told to
    quit), and ``words``, that and the last thing it said."""

    clean: bool
    words: str


async def ended(log: Path, wait: float = 1.0) -> Ending | None:
    """``ending`` of a QEMU that has ended, waiting up to ``wait`` seconds for its shell to
    write how (it does so just after QEMU is gone); ``None`` without a log."""
    if not log.exists():  # a QEMU that a release before these logs started
        return None
    try:
        return await until(lambda: ending(log), interval=processes.POLL, timeout=wait)
    except TimeoutError:
        return None


def ending(log: Path) -> Ending | None:
    """How the QEMU of ``log`` ended, once it has; ``None`` while it runs (or if it left no
    log)."""
    end = read_end(log, TAIL_BYTES)
    if end is None:
        return None
    lines = end.decode(errors="replace").splitlines()
    ended = [i for i, line in enumerate(lines) if line.startswith(ENDED)]
    if not ended:
        return None
    status = lines[ended[-1]].removeprefix(ENDED).strip()
    if status == "0":  # its words, if any, were warnings of its start
        return Ending(True, "it exited normally (the guest powered off, or QEMU was told to quit)")
    said = [line.strip() for line in lines[: ended[-1]] if line.strip()]
    how = _how(status)
    return Ending(False, f"{how}: {said[-1]}" if said else how)


def _how(status: str) -> str:
    """A shell's exit status, as words."""
    if not status.isdigit():
        return "it ended"
    code = int(status)
    if code > 128:
        try:
            name = signal.Signals(code - 128).name
        except ValueError:
            name = f"signal {code - 128}"
        return f"it was killed by {name}"
    return f"it exited with status {code}"
