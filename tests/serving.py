"""``goldclone serve`` as a real program: started, waited for, and stopped by its PID."""

from __future__ import annotations

import os
import pty
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

import httpx

GOLDCLONE = [sys.executable, "-m", "goldclone.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServerLog:
    """What a served ``goldclone`` logged: so far while it runs, all of it once stopped."""

    def __init__(self, file: IO[str]) -> None:
        self._file: IO[str] | None = file
        self._final = ""

    def text(self) -> str:
        return _read(self._file) if self._file is not None else self._final

    def close(self) -> None:
        self._final, self._file = self.text(), None


@contextmanager
def serving(argv: list[str], env: dict[str, str], port: int) -> Iterator[ServerLog]:
    """Run ``argv`` (a ``goldclone serve``) until ``GET /healthz`` answers, and yield its log.
    On exit it is stopped with SIGTERM, by its PID, and must shut down gracefully."""
    with (
        tempfile.TemporaryFile("w+") as file,
        subprocess.Popen(argv, env={**os.environ, **env}, stderr=file) as proc,
    ):
        log = ServerLog(file)
        try:
            assert _answers(port, proc), f"serve did not answer: {log.text()}"
            yield log
        finally:
            proc.send_signal(signal.SIGTERM)
            # uvicorn shuts down gracefully, then re-raises the signal it caught
            assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
            log.close()
            assert "Application shutdown complete" in log.text()


def serve_until_answering(argv: list[str], env: dict[str, str], port: int) -> str:
    """Start ``goldclone serve``, wait for it to answer, stop it; return what it logged."""
    with serving(argv, env, port) as log:
        pass
    return log.text()


def _answers(port: int, proc: subprocess.Popen[bytes]) -> bool:
    with httpx.Client() as client:
        while proc.poll() is None:
            try:
                response = client.get(f"http://127.0.0.1:{port}/healthz")
            except httpx.ConnectError:
                time.sleep(0.05)
                continue
            return bool(response.json() == {"status": "ok"})
    return False


def _read(log: IO[str]) -> str:
    log.seek(0)
    return log.read()


def in_pty(argv: list[str], env: dict[str, str], until: str | None = None) -> tuple[str, int]:
    """Run ``argv`` on a pseudo-terminal; with ``until``, send it SIGINT (as Ctrl-C does) once
    that text has been shown. Returns what it showed and its exit code."""
    pid, fd = pty.fork()
    if pid == 0:  # the child
        # as a shell starts a program on a terminal: a test run started in the background
        # (where a shell ignores SIGINT) must not pass that on, or Ctrl-C would do nothing
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execvpe(argv[0], argv, env)
    shown = b""
    interrupted = False
    try:
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            shown += data
            if until and not interrupted and until.encode() in shown:
                os.kill(pid, signal.SIGINT)
                interrupted = True
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    return shown.decode(errors="replace"), os.waitstatus_to_exitcode(status)
