"""The ``goldclone`` command's exit codes: defined once, and listed in every ``--help``."""

from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    OK = 0
    FAILED = 1
    """A VM or image ended in error, or the server refused the operation."""
    USAGE = 2
    """Bad options or input, also a request the server found invalid."""
    UNREACHABLE = 3
    TIMEOUT = 4
    INTERRUPTED = 130
    """Ctrl-C, as a shell reports SIGINT."""
    BROKEN_PIPE = 141
    """The output was closed before all of it was written, as a shell reports SIGPIPE."""


_MEANINGS = {
    Exit.OK: "success",
    Exit.FAILED: "a VM or image ended in error, or the server refused (its code is printed)",
    Exit.USAGE: "a usage error, also a request that the server found invalid",
    Exit.UNREACHABLE: "the server cannot be reached",
    Exit.TIMEOUT: "a wait timed out (the VM or image goes on)",
    Exit.INTERRUPTED: "interrupted by Ctrl-C (a VM being created goes on)",
    Exit.BROKEN_PIPE: "the output was closed before all of it was written",
}
HELP = "exit codes:\n" + "\n".join(f"  {code:<4} {text}" for code, text in _MEANINGS.items())
