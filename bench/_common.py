"""What the benchmark scripts share: the run's header, scratch space, statistics, the demo
image and the in-process goldclone server. Not a benchmark itself."""

from __future__ import annotations

import asyncio
import atexit
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from goldclone import settings_sources
from goldclone.demo.image import build_demo_image
from goldclone.drivers.qemu import QemuDriver
from goldclone.drivers.qemu.accel import choose_accel
from goldclone.drivers.qemu.network import Networks
from tests.netns import foreign_network
from tests.servers import FileServer

QEMU = "qemu-system-x86_64"
POLL = 0.02
"""How often the benchmarks poll a file or a raw guest: every 20 ms."""
WAIT_MAX = 300.0
"""The longest ``?timeout=`` that GET /vms/{id}?wait=true takes."""


def start(title: str) -> None:
    """Refuse to run outside a private network namespace, then print the run's header."""
    if os.geteuid() != 0:
        sys.exit("the benchmarks need root: run them with bench/run")
    if problem := foreign_network():
        sys.exit(f"run the benchmarks with bench/run, in a private network namespace ({problem})")
    print(f"== {title}")
    print(f"date:    {datetime.now(UTC).isoformat(timespec='seconds')}")
    print(f"machine: {machine()}")
    print(f"code:    {revision()}")
    print(f"command: python {' '.join(sys.argv)}")
    print(f"load:    {load()} at the start")
    atexit.register(lambda: print(f"load:    {load()} at the end"))
    print()


def revision() -> str:
    """The commit the code is at, and whether src/ has uncommitted changes."""
    git = ["git", "-C", str(Path(__file__).resolve().parents[1])]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--", "src"], capture_output=True, text=True
    )
    changes = " + uncommitted changes in src/" if dirty.stdout.strip() else ""
    return f"{head.stdout.strip() or 'unknown'}{changes}"


def load() -> str:
    """The 1-minute load average, and how many other QEMUs and test runs share the machine."""
    others = {"qemu-system": 0, "pytest": 0}
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()[:300] if entry.name.isdigit() else b""
        except OSError:
            continue
        for name in others:
            others[name] += name.encode() in cmdline
    busy = ", ".join(f"{count} {name}" for name, count in others.items())
    return f"{os.getloadavg()[0]:.2f} (other processes: {busy})"


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    qemu = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout
    accel = asyncio.run(choose_accel("auto", QEMU))
    return (
        f"{os.cpu_count()} cores ({model}), {mem_gb:.0f} GB RAM, Linux {platform.release()}, "
        f"{qemu.splitlines()[0]}, accel {accel}"
    )


@contextmanager
def scratch() -> Iterator[Path]:
    """A short temporary folder (QMP socket paths must stay short), removed afterwards; the
    logs in it are kept in the temp dir if the run fails."""
    path = Path(tempfile.mkdtemp(prefix="gcb"))
    try:
        yield path
    except BaseException:
        for log in path.glob("*.log"):  # what the server said is what a failed run needs
            kept = Path(tempfile.gettempdir()) / f"{path.name}-{log.name}"
            shutil.copyfile(log, kept)
            print(f"kept {kept}", file=sys.stderr)
        raise
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- numbers -----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.1f} ms"


def describe(label: str, seconds: list[float]) -> str:
    """One line: the median, min, p90 and max of ``seconds``."""
    return (
        f"{label:<34} median {ms(statistics.median(seconds))}   min {ms(min(seconds))}   "
        f"p90 {ms(percentile(seconds, 90))}   max {ms(max(seconds))}   (n={len(seconds)})"
    )


def verdict(met: bool) -> str:
    return "MET" if met else "MISSED"


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds``."""

    seconds = 0.0

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *_: object) -> None:
        self.seconds = time.perf_counter() - self._start


# -- VMs through the real server ---------------------------------------------------------------


class Server:
    """A ``goldclone serve`` process on loopback and an HTTP client for it."""

    def __init__(self, data_dir: Path, port: int, process: subprocess.Popen[bytes]) -> None:
        self.data_dir, self.process = data_dir, process
        self.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60)

    async def post_vm(self, body: dict[str, Any]) -> dict[str, Any]:
        response = await self.client.post("/vms", json=body)
        if response.status_code != 202:
            raise RuntimeError(f"POST /vms answered {response.status_code}: {response.text}")
        vm: dict[str, Any] = response.json()
        return vm

    async def delete(self, vm_id: str) -> None:
        response = await self.client.delete(f"/vms/{vm_id}")
        if response.status_code != 204:
            raise RuntimeError(f"DELETE answered {response.status_code}: {response.text}")

    async def delete_all(self) -> None:
        for vm in (await self.client.get("/vms")).json()["vms"]:
            await self.delete(vm["id"])


@asynccontextmanager
async def serve(data_dir: Path, **env: str) -> AsyncIterator[Server]:
    """Run the real server (``goldclone serve``) in a process of its own, as in production,
    with ``env`` added to its environment (``GOLDCLONE_IP_TIMEOUT="900"``).

    Its log goes to ``data_dir/../server.log``. On exit every VM is deleted, the server is
    stopped, and every guest and network it left is removed.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = _spawn(data_dir, port, env)
    server = Server(data_dir, port, process)
    try:
        await _until_up(server)
        yield server
        await server.delete_all()
    finally:
        process.terminate()
        try:
            await asyncio.to_thread(process.wait, 30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        await server.client.aclose()
        networks = Networks(
            settings_sources.from_env(env).network, data_dir.absolute() / "networks"
        )
        driver = QemuDriver(data_dir, networks, QEMU)
        await driver.bounds.prepare()  # so that a guest's cgroups go with it
        vms = data_dir / "vms"
        for vm_dir in list(vms.iterdir()) if vms.is_dir() else []:
            await driver.destroy(vm_dir.name, None)  # a pool's machines, which the server kept
        await networks.teardown()
        await driver.bounds.close()


def _spawn(data_dir: Path, port: int, extra: dict[str, str]) -> subprocess.Popen[bytes]:
    env = os.environ | {"GOLDCLONE_DATA_DIR": str(data_dir), "PORT": str(port),
                        "GOLDCLONE_SHUTDOWN_TIMEOUT": "5"} | extra  # fmt: skip
    argv = ["-m", "goldclone.cli", "serve"]
    with (data_dir.parent / "server.log").open("wb") as log:
        return subprocess.Popen([sys.executable, *argv], env=env, stdout=log, stderr=log)


async def _until_up(server: Server) -> None:
    for _ in range(300):
        if server.process.poll() is not None:
            raise RuntimeError("goldclone serve exited at start; see server.log")
        try:
            await server.client.get("/vms")
            return
        except httpx.TransportError:
            await asyncio.sleep(0.1)
    raise RuntimeError("goldclone serve did not answer within 30 s")


def vm_request(url: str, checksum: str, cpus: int = 1, memory: int = 256) -> dict[str, Any]:
    image = {"url": url, "checksum": checksum, "checksum_type": "sha256"}
    return {"cpus": cpus, "memory": memory, "network_type": "nat", "image": image}


def closed_port_url() -> str:
    """A URL on a loopback port that nothing listens on: a download there fails at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/nothing.tar.gz"


def phase_at(vm: dict[str, Any], phase: str) -> datetime:
    """When the VM's timeline reached ``phase`` (host clock, millisecond resolution)."""
    return next(datetime.fromisoformat(e["at"]) for e in vm["timeline"] if e["phase"] == phase)


def span(vm: dict[str, Any], first: str, last: str) -> float:
    """Seconds between two phases of the VM's timeline."""
    return (phase_at(vm, last) - phase_at(vm, first)).total_seconds()


async def wait_running(server: Server, vm_id: str, timeout: float = 180.0) -> dict[str, Any]:
    """Wait, as the client does (``GET /vms/{id}?wait=true``, answered within milliseconds of
    a change), until the VM runs; an error or a timeout raises. Polling instead, every 20 ms,
    cost 20 VMs posted at once 1000 requests a second, a core of this 2-core host."""
    deadline = time.perf_counter() + timeout
    while True:
        left = max(0.0, deadline - time.perf_counter())
        try:
            response = await server.client.get(
                f"/vms/{vm_id}",
                params={"wait": "true", "timeout": min(left, WAIT_MAX)},
                timeout=min(left, WAIT_MAX) + 30,
            )
        except (httpx.RemoteProtocolError, httpx.ReadError):  # a kept-alive connection closed
            continue
        vm: dict[str, Any] = response.json()
        if vm["status"] == "running":
            return vm
        if vm["status"] != "creating" or time.perf_counter() > deadline:
            raise RuntimeError(f"VM {vm_id} did not come up: {vm}")


@asynccontextmanager
async def demo_server(work: Path, **env: str) -> AsyncIterator[tuple[Server, dict[str, Any]]]:
    """A goldclone server (with ``env`` added to its environment, as for ``serve``) whose cache
    holds the demo image, with the request that boots it.

    The cache is warmed, and the nat network brought up, by one VM that is booted and deleted.
    The image is served by a real HTTP server on loopback.
    """
    package = work / "served" / "demo.tar.gz"
    package.parent.mkdir()
    digest = await build_demo_image(package)
    with FileServer(package.parent).running() as files:
        body = vm_request(files.url(package.name), digest)
        async with serve(work / "data", **env) as server:
            vm = await wait_running(server, (await server.post_vm(body))["id"])
            await server.delete(vm["id"])
            yield server, body
