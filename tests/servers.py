"""Real HTTP servers on loopback for the tests: an image server and a callback receiver."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A loopback port that nothing listens on (for now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


@contextmanager
def _serving(
    handler: type[BaseHTTPRequestHandler], owner: Any, port: int = 0, address: str = "127.0.0.1"
) -> Iterator[_Server]:
    server = _Server((address, port), handler)
    server.owner = owner  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class FileServer:
    """Serves the files of a folder and counts the GETs of each path.

    ``/stall/NAME`` sends the headers of NAME and then nothing, to make a download time out.
    ``/hold/NAME`` sends the first half of NAME and then nothing, to catch a download midway.
    ``/slow/NAME`` sends NAME at about 10 MB/s, so that a download is seen in progress.
    It listens on loopback, or on ``address`` (``0.0.0.0``: every address of this namespace).
    """

    def __init__(self, root: Path, address: str = "127.0.0.1") -> None:
        self.root = root
        self.address = address
        self.gets: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._release = threading.Event()
        self.port = 0

    def url(self, name: str, at: str = "127.0.0.1") -> str:
        """The URL of ``name``, reached at the address ``at``."""
        return f"http://{at}:{self.port}/{name}"

    @contextmanager
    def running(self) -> Iterator[FileServer]:
        with _serving(_FileHandler, self, address=self.address) as server:
            self.port = server.server_address[1]
            try:
                yield self
            finally:
                self._release.set()

    def _count(self, path: str) -> None:
        with self._lock:
            self.gets[path] += 1


class _FileHandler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        owner: FileServer = self.server.owner  # type: ignore[attr-defined]
        path = self.path.lstrip("/")
        owner._count(path)
        mode, _, name = path.rpartition("/")
        file = owner.root / name
        if mode not in ("", "stall", "hold", "slow") or not file.is_file():
            self.send_error(404)
            return
        size = file.stat().st_size
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        if mode == "hold":
            with file.open("rb") as data:
                self.wfile.write(data.read(size // 2))
            self.wfile.flush()
        if mode in ("stall", "hold"):
            owner._release.wait(60)
            return
        with file.open("rb") as data:
            while chunk := data.read(1 << 20):
                self.wfile.write(chunk)
                if mode == "slow":
                    time.sleep(0.1)  # throttling the sender, not waiting for anything


class CallbackReceiver:
    """Records the JSON bodies POSTed to it, and the headers of every attempt; answers 503 to
    the first ``fail_first`` attempts (or ``fail_status``), with ``Retry-After: retry_after``
    if that is set, or redirects them to ``redirect``. ``port`` 0 takes a free one; it listens
    on loopback, or on ``address``."""

    def __init__(
        self,
        fail_first: int = 0,
        retry_after: str | None = None,
        redirect: str | None = None,
        fail_status: int = 503,
        port: int = 0,
        address: str = "127.0.0.1",
    ) -> None:
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.retry_after = retry_after
        self.redirect = redirect
        self.attempts = 0
        self.bodies: list[dict[str, Any]] = []
        self.raw_bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        self.times: list[float] = []
        self._cond = threading.Condition()
        self.port = port
        self.address = address

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/vm-ready"

    @contextmanager
    def running(self) -> Iterator[CallbackReceiver]:
        with _serving(_CallbackHandler, self, self.port, self.address) as server:
            self.port = server.server_address[1]
            yield self

    def _record(self, body: bytes, headers: dict[str, str]) -> bool:
        with self._cond:
            self.attempts += 1
            self.headers.append(headers)
            self.times.append(time.monotonic())
            accepted = self.attempts > self.fail_first
            if accepted:
                self.raw_bodies.append(body)
                self.bodies.append(json.loads(body))
                self._cond.notify_all()
            return accepted

    def wait_for(self, count: int, timeout: float) -> list[dict[str, Any]]:
        """Block until ``count`` bodies have arrived (a thread wait, for use via to_thread)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.bodies) < count:
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    raise AssertionError(f"{len(self.bodies)} callbacks, expected {count}")
            return list(self.bodies)


class _CallbackHandler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        owner: CallbackReceiver = self.server.owner  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        ok = owner._record(body, {k.lower(): v for k, v in self.headers.items()})
        if ok:
            self.send_response(204)
        elif owner.redirect is not None:
            self.send_response(307)
            self.send_header("Location", owner.redirect)
        else:
            self.send_response(owner.fail_status)
            if owner.retry_after is not None:
                self.send_header("Retry-After", owner.retry_after)
        self.send_header("Content-Length", "0")
        self.end_headers()
