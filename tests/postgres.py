"""A real PostgreSQL server for the tests: Debian's package, a cluster in a temp dir that
listens on a unix socket only, run as the ``postgres`` user when the tests run as root (the
server refuses root) or as the tests' own user, and stopped by its PID at the end. Each test
gets a database of its own."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

SERVER_USER = "postgres"
"""The OS account that runs the server as root would, and the database superuser's name."""


def _bin_dir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        pytest.fail("PostgreSQL is not installed: apt install postgresql (make deps does)")
    return found[-1].parent


class PostgresCluster:
    """One cluster: ``start``, ``new_database`` for each test, ``stop`` at the end."""

    def __init__(self) -> None:
        self._bin = _bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="gcpg"))
        self._run_as = ["runuser", "-u", SERVER_USER, "--"] if os.geteuid() == 0 else []
        if self._run_as:
            account = pwd.getpwnam(SERVER_USER)
            os.chown(self.root, account.pw_uid, account.pw_gid)
        self._data = self.root / "data"
        self._pid: int | None = None

    def _as_server_user(self, *argv: str) -> None:
        subprocess.run([*self._run_as, *argv], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._as_server_user(str(self._bin / "initdb"), "-D", str(self._data), "-A", "trust",
                             "-U", SERVER_USER, "--no-sync")  # fmt: skip
        self.resume()

    def resume(self) -> None:
        """Start the server on the cluster's data (again, after ``pause``)."""
        # no TCP, no durability: a test cluster that lives as long as the run
        options = f"-k {self.root} -c listen_addresses='' -c fsync=off -c max_connections=200"
        self._as_server_user(str(self._bin / "pg_ctl"), "-D", str(self._data), "-o", options,
                             "-l", str(self.root / "server.log"), "-w", "start")  # fmt: skip
        self._pid = int((self._data / "postmaster.pid").read_text().split()[0])

    def pause(self) -> None:
        """Stop the server as an outage would (fast shutdown: its clients are cut off),
        keeping its data for ``resume``."""
        self._as_server_user(str(self._bin / "pg_ctl"), "-D", str(self._data), "-m", "fast",
                             "-w", "-t", "30", "stop")  # fmt: skip

    def stop(self) -> None:
        """Stop the server (pg_ctl's fast shutdown, then SIGKILL to its PID if it is still
        there), and remove the cluster."""
        try:
            if self._pid is not None and _alive(self._pid):
                with contextlib.suppress(subprocess.SubprocessError):
                    self._as_server_user(str(self._bin / "pg_ctl"), "-D", str(self._data),
                                         "-m", "fast", "-w", "-t", "30", "stop")  # fmt: skip
                if _alive(self._pid):
                    os.kill(self._pid, signal.SIGKILL)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    async def new_database(self, template: str | None = None) -> str:
        """A new database, empty or a copy of ``template``, as an SQLAlchemy URL."""
        import asyncpg

        name = f"t{uuid.uuid4().hex[:12]}"
        admin = await asyncpg.connect(host=str(self.root), user=SERVER_USER, database="postgres")
        try:
            copied = f' TEMPLATE "{template}"' if template else ""
            await admin.execute(f'CREATE DATABASE "{name}"{copied}')
        finally:
            await admin.close()
        return f"postgresql+asyncpg://{SERVER_USER}@/{name}?host={self.root}"


@contextlib.contextmanager
def running_cluster() -> Iterator[PostgresCluster]:
    """A cluster started for the block, and stopped (and removed) after it."""
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
