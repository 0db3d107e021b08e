"""The one way goldclone runs an external program: with a timeout, and typed errors."""

from __future__ import annotations

import asyncio
import logging
import shutil

from goldclone.errors import CommandError, CommandTimeout

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0


def _first_line(data: bytes) -> str:
    for line in data.decode(errors="replace").splitlines():
        if line.strip():
            return line.strip()
    return ""


async def run(
    *argv: str,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
    stdin: bytes | None = None,
) -> tuple[int, str, str]:
    """Run ``argv`` and return ``(returncode, stdout, stderr)``.

    Raises ``CommandTimeout`` (after killing the program) when it runs past ``timeout``, and
    ``CommandError`` with the first stderr line when it exits non-zero and ``check`` is set.
    A program that is not installed is a ``CommandError`` that says so.
    """
    args = list(argv)
    if shutil.which(args[0]) is None:
        raise CommandError(args, 127, f"{args[0]} is not installed or not on PATH")
    log.debug("run %s", args)
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError:
        raise CommandTimeout(args, timeout) from None
    finally:
        if proc.returncode is None:  # timed out or cancelled: never leave it running
            proc.kill()
            await proc.wait()
    code = proc.returncode if proc.returncode is not None else -1
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    if check and code != 0:
        raise CommandError(args, code, _first_line(err) or _first_line(out))
    return code, stdout, stderr
