"""Crash consistency: ``goldclone serve`` is killed with SIGKILL at each phase of a create and
of a delete, started again on the same data dir, and every VM must end ``running`` with its
IP or ``error`` with nothing of it left: no qemu, tap, lease, clone, partial download or
half-made gold image. Each phase is reached from the outside: an image server that holds a
download, a package big enough to watch being unpacked, and stand-ins for ``qemu-img``,
``ip`` and qemu that wait at the gate until the test lets them through.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from goldclone.drivers.qemu.network import Networks
from goldclone.drivers.qemu.network.manager import tap_name
from goldclone.settings import NetworkConfig
from tests.conftest import checksum
from tests.harness import forget, leftovers, links, processes_mentioning, settled
from tests.packages import extract_disk
from tests.servers import CallbackReceiver, FileServer
from tests.serving import GOLDCLONE, free_port

pytestmark = pytest.mark.root

T = TypeVar("T")

FAST = 0.5
"""Seconds within which GET and LIST must answer, whatever the guests do."""


def until(probe: Callable[[], T | None], what: str, timeout: float = 60.0) -> T:
    """Poll ``probe`` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.01)


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie has)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


class Gate:
    """A stand-in for ``program`` on the service's PATH: when its arguments match the shell
    ``case`` pattern ``when``, it writes its PID to ``held`` and waits until the test calls
    ``open``; then, or at once for other arguments, it runs the real program."""

    def __init__(self, folder: Path, program: str, when: str = "*") -> None:
        real = shutil.which(program)
        assert real is not None, program
        self.held = folder / f"{program}.held"
        self._open = folder / f"{program}.open"
        script = folder / program
        script.write_text(
            "#!/bin/sh\n"
            f'case " $* " in {when})\n'
            f"  echo $$ > {self.held}.new && mv {self.held}.new {self.held}\n"
            f"  while [ ! -e {self._open} ]; do sleep 0.01; done;;\n"
            "esac\n"
            f'exec {real} "$@"\n'
        )
        script.chmod(0o755)

    def pid(self) -> int:
        """The PID of the held program, once it is held."""
        return until(lambda: self.held.exists() and int(self.held.read_text()), "the gate")

    def open(self) -> None:
        self._open.touch()


class Service:
    """``goldclone serve`` on one data dir, in a process of its own that the test kills.
    A test may change its environment, ``env``, before ``start``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.gates = data_dir.with_name(f"{data_dir.name}-gates")
        self.gates.mkdir()
        self.env = {
            "GOLDCLONE_ACCEL": "tcg",
            "GOLDCLONE_IP_TIMEOUT": "60",
            "GOLDCLONE_SHUTDOWN_TIMEOUT": "1",
            "GOLDCLONE_CALLBACK_SCHEDULE": "0,0.1",
            "PATH": f"{self.gates}:{os.environ['PATH']}",
        }
        self.port = free_port()
        self.log = data_dir.with_name(f"{data_dir.name}.log")
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)
        self._proc: subprocess.Popen[bytes] | None = None
        self._gates: list[Gate] = []

    def gate(self, program: str, when: str = "*") -> Gate:
        """Hold ``program`` at a gate whenever its arguments match ``when``."""
        gate = Gate(self.gates, program, when)
        self._gates.append(gate)
        return gate

    def start(self) -> float:
        """Start the server; return how many seconds it took to answer."""
        started = time.monotonic()
        argv = [*GOLDCLONE, "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--data-dir", str(self.data_dir)]  # fmt: skip
        with self.log.open("a") as log:
            self._proc = subprocess.Popen(
                argv, env={**os.environ, **self.env}, stdout=subprocess.DEVNULL, stderr=log
            )
        until(self._answers, "the server to answer", timeout=30)
        return time.monotonic() - started

    def _answers(self) -> bool:
        assert self._proc is not None and self._proc.poll() is None, self.logged()
        try:
            return self.http.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def kill(self) -> None:
        """SIGKILL, by PID: the service gets no chance to clean anything up."""
        assert self._proc is not None
        os.kill(self._proc.pid, signal.SIGKILL)
        self._proc.wait()
        self._proc = None

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=60)
            self._proc = None

    def logged(self) -> str:
        return self.log.read_text()

    def post(self, url: str, digest: str, **changes: Any) -> str:
        body = {"cpus": 1, "memory": 256, "image": {"url": url, "checksum": digest}} | changes
        response = self.http.post("/vms", json=body)
        assert response.status_code == 202, response.text
        vm_id: str = response.json()["id"]
        return vm_id

    def vm(self, vm_id: str) -> dict[str, Any]:
        response = self.http.get(f"/vms/{vm_id}")
        assert response.status_code == 200, response.text
        vm: dict[str, Any] = response.json()
        return vm

    def phases(self, vm_id: str) -> list[str]:
        return [entry["phase"] for entry in self.vm(vm_id)["timeline"]]

    def wait_for(self, vm_id: str, status: str, timeout: float = 60.0) -> dict[str, Any]:
        return until(lambda: (vm := self.vm(vm_id))["status"] == status and vm, status, timeout)

    def qemu_pid(self, vm_id: str) -> int:
        pidfile = self.data_dir / "vms" / vm_id / "qemu.pid"
        return until(lambda: pidfile.exists() and int(pidfile.read_text() or 0), "qemu's pid")

    def answers_fast(self, vm_id: str) -> None:
        """GET and LIST answer within ``FAST`` seconds."""
        for path in (f"/vms/{vm_id}", "/vms"):
            started = time.monotonic()
            self.http.get(path)
            assert time.monotonic() - started < FAST, f"GET {path} is slow"

    def clean_up(self) -> None:
        """Delete every VM through a fresh server and stop it; then make sure that nothing of
        the test runs on (a guest or DHCP server left by a failed test) and no network stays."""
        for gate in self._gates:
            gate.open()
        try:
            self.stop()
            self.start()
            for vm in self.http.get("/vms").json()["vms"]:
                self.http.delete(f"/vms/{vm['id']}")
            self.stop()
        finally:
            self.http.close()
            for pid in processes_mentioning(str(self.data_dir)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            networks = Networks(NetworkConfig(), self.data_dir.absolute() / "networks")
            asyncio.run(networks.teardown())


@pytest.fixture
def service(workdir: Path) -> Iterator[Service]:
    data_dir = Path(tempfile.mkdtemp(prefix="c", dir=workdir))
    service = Service(data_dir)
    try:
        yield service
    finally:
        service.clean_up()
        for folder in (data_dir, service.gates):
            shutil.rmtree(folder, ignore_errors=True)
        service.log.unlink(missing_ok=True)


@pytest.fixture
def demo(file_server: FileServer, demo_package: Path) -> tuple[str, str]:
    return file_server.url(demo_package.name), checksum(demo_package)


def assert_interrupted(service: Service, vm_id: str) -> dict[str, Any]:
    """The VM ends in ``error`` with the code ``interrupted``, and nothing of it is left."""
    vm = service.wait_for(vm_id, "error")
    assert vm["error"]["code"] == "interrupted", vm
    assert leftovers(service.data_dir, vm) == []
    return vm


def stored_status(data_dir: Path, vm_id: str) -> str | None:
    """The VM's status in the store's own table, read without asking the service."""
    db = sqlite3.connect(f"file:{data_dir / 'state.db'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT status FROM vms WHERE id = ?", (vm_id,)).fetchone()
    except sqlite3.OperationalError:  # the service is writing
        return None
    finally:
        db.close()
    return None if row is None else str(row[0])


def delete_status(service: Service, vm_id: str) -> int:
    """``DELETE /vms/{id}`` on a connection of its own, for a thread."""
    return httpx.delete(f"http://127.0.0.1:{service.port}/vms/{vm_id}", timeout=60).status_code


@pytest.fixture(scope="module")
def big_package(workdir: Path, demo_package: Path, file_server: FileServer) -> Path:
    """The demo disk behind 512 MiB of zeros: a few MB to download, a while to unpack."""
    padding = workdir / "padding.bin"
    with padding.open("wb") as sparse:
        sparse.truncate(512 << 20)
    package = file_server.root / "big.tar.gz"
    with tarfile.open(package, "w:gz", compresslevel=1) as tar:
        tar.add(padding, "padding.bin")
        tar.add(extract_disk(demo_package, workdir / "big-disk.qcow2"), "disk.qcow2")
    padding.unlink()
    return package


# -- killed at each phase of a create ------------------------------------------------------------


def test_killed_while_downloading(
    service: Service, file_server: FileServer, demo_package: Path, callbacks: CallbackReceiver
) -> None:
    service.start()
    url = file_server.url(f"hold/{demo_package.name}")
    vm_id = service.post(url, checksum(demo_package), callback_url=callbacks.url)
    until(lambda: (service.vm(vm_id)["progress"] or {}).get("bytes_done"), "a part of it")
    service.kill()
    assert list((service.data_dir / "downloads").iterdir()), "a partial download is left"

    service.start()
    vm = assert_interrupted(service, vm_id)
    assert list((service.data_dir / "images").iterdir()) == []
    assert callbacks.wait_for(1, 30) == [vm]


def test_killed_while_unpacking(
    service: Service, file_server: FileServer, big_package: Path
) -> None:
    service.start()
    vm_id = service.post(file_server.url(big_package.name), checksum(big_package))
    images = service.data_dir / "images"
    until(lambda: list(images.glob(".tmp-*")), "the unpacking")
    service.kill()
    assert [path.name[:5] for path in images.iterdir()] == [".tmp-"], "killed mid-unpack"

    service.start()
    assert_interrupted(service, vm_id)
    assert list(images.iterdir()) == [], "no gold image, whole or half-made"


def test_killed_while_cloning(service: Service, demo: tuple[str, str]) -> None:
    clone = service.gate("qemu-img", when='*" create "*')
    service.start()
    vm_id = service.post(*demo)
    held = clone.pid()
    assert service.phases(vm_id)[-1] == "cloning"
    service.kill()
    clone.open()  # the clone is made after all, and no service records it
    until(lambda: gone(held), "qemu-img to finish")
    assert (service.data_dir / "vms" / vm_id / "disk.qcow2").exists()

    service.start()
    assert_interrupted(service, vm_id)


def test_killed_between_making_the_tap_and_recording_it(
    service: Service, demo: tuple[str, str]
) -> None:
    enslave = service.gate("ip", when='*" link set gc"*" master "*')
    service.start()
    vm_id = service.post(*demo)
    held = enslave.pid()
    service.kill()
    enslave.open()
    until(lambda: gone(held), "ip to finish")
    assert tap_name(vm_id) in links()

    service.start()
    assert_interrupted(service, vm_id)


def test_killed_while_qemu_starts(service: Service, demo: tuple[str, str]) -> None:
    qemu = service.gate("qemu-system-x86_64")
    service.start()
    vm_id = service.post(*demo)
    held = qemu.pid()
    assert service.phases(vm_id)[-1] == "booting"
    service.kill()
    assert not (service.data_dir / "vms" / vm_id / "qemu.pid").exists()

    service.start()  # the gate stays shut: this qemu never writes its pidfile
    assert_interrupted(service, vm_id)
    assert gone(held)


def test_killed_while_waiting_for_the_ip(service: Service, demo: tuple[str, str]) -> None:
    service.start()
    vm_id = service.post(*demo)
    service.qemu_pid(vm_id)
    mac = service.vm(vm_id)["mac_address"]
    service.kill()
    leases = service.data_dir / "networks" / "nat" / "leases"
    assert mac not in leases.read_text()
    until(lambda: mac in leases.read_text(), "the guest's lease, with the service down")

    service.start()
    assert_interrupted(service, vm_id)


# -- running guests and deletes across a crash -----------------------------------------------------


def test_a_running_guest_is_adopted_and_one_that_dies_is_stopped(
    service: Service, demo: tuple[str, str]
) -> None:
    service.env["GOLDCLONE_RECONCILE_INTERVAL"] = "1"
    service.start()
    vm_id = service.post(*demo)
    vm = service.wait_for(vm_id, "running")
    pid = service.qemu_pid(vm_id)
    service.kill()

    service.start()
    assert settled(service.vm(vm_id)) == settled(vm)
    assert service.qemu_pid(vm_id) == pid and not gone(pid), "the same qemu, not restarted"
    assert "goldclone demo guest" in httpx.get(f"http://{vm['ip_address']}/", timeout=10).text

    os.kill(pid, signal.SIGKILL)
    until(lambda: stored_status(service.data_dir, vm_id) == "stopped", "the periodic check")
    stopped = service.vm(vm_id)
    assert stopped["status_reason"].startswith("its QEMU ended: it was killed by SIGKILL"), stopped


def test_a_delete_cut_off_by_a_crash_is_finished(service: Service, demo: tuple[str, str]) -> None:
    service.env["GOLDCLONE_SHUTDOWN_TIMEOUT"] = "10"
    service.start()
    vm_id = service.post(*demo)
    vm = service.wait_for(vm_id, "running")
    pid = service.qemu_pid(vm_id)
    os.kill(pid, signal.SIGSTOP)  # its monitor hangs, so the DELETE takes seconds
    with ThreadPoolExecutor(1) as pool:
        deleting = pool.submit(delete_status, service, vm_id)
        service.wait_for(vm_id, "deleting")
        service.kill()
        with pytest.raises(httpx.TransportError):
            deleting.result()

    assert service.start() < 5, "the hung guest is dealt with in the background"
    service.answers_fast(vm_id)
    until(lambda: service.http.get(f"/vms/{vm_id}").status_code == 404, "the delete", 30)
    assert gone(pid)
    assert leftovers(service.data_dir, vm) == []


def test_a_hung_guest_holds_up_nothing_and_concurrent_deletes_are_safe(
    service: Service, demo: tuple[str, str]
) -> None:
    service.env["GOLDCLONE_SHUTDOWN_TIMEOUT"] = "10"
    service.start()
    vm_id = service.post(*demo)
    vm = service.wait_for(vm_id, "running")
    pid = service.qemu_pid(vm_id)
    os.kill(pid, signal.SIGSTOP)
    service.answers_fast(vm_id)

    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        deletes = [pool.submit(delete_status, service, vm_id) for _ in range(2)]
        service.wait_for(vm_id, "deleting")
        service.answers_fast(vm_id)
        statuses = sorted(delete.result() for delete in deletes)
    # powerdown and quit each time out after 2 s, without waiting out the shutdown timeout;
    # then SIGKILL stops even a stopped process
    assert time.monotonic() - started < 10
    assert statuses == [204, 404], "one destroys it; the other waits for it, and finds it gone"
    assert gone(pid)
    assert leftovers(service.data_dir, vm) == []
    assert service.http.delete(f"/vms/{vm_id}").status_code == 404


def test_delete_while_a_failed_create_is_torn_down(
    service: Service, file_server: FileServer
) -> None:
    """The guest boots nothing, so it never gets an IP and ignores the power button: the
    teardown after ``ip-timeout`` waits out the shutdown timeout, and the DELETE comes then."""
    service.env |= {"GOLDCLONE_IP_TIMEOUT": "2", "GOLDCLONE_SHUTDOWN_TIMEOUT": "5"}
    disk = bytearray(1 << 20)
    disk[510:512] = b"\x55\xaa"
    package = file_server.root / f"{uuid.uuid4().hex}.raw"
    package.write_bytes(bytes(disk))
    service.start()
    vm_id = service.post(file_server.url(package.name), checksum(package))
    service.qemu_pid(vm_id)
    vm = service.vm(vm_id)
    until(lambda: f"VM {vm_id} failed: ip-timeout" in service.logged(), "the create to fail")

    assert service.http.delete(f"/vms/{vm_id}").status_code == 204
    assert service.http.get(f"/vms/{vm_id}").status_code == 404
    assert leftovers(service.data_dir, vm) == []


# -- what the store does not know ------------------------------------------------------------------


def test_what_the_store_does_not_know_is_removed_at_start(
    service: Service, demo: tuple[str, str]
) -> None:
    service.start()
    vm_id = service.post(*demo)
    vm = service.wait_for(vm_id, "running")
    pid = service.qemu_pid(vm_id)
    service.kill()
    forget(service.data_dir, vm_id)
    folder = service.data_dir / "vms" / str(uuid.uuid4())
    folder.mkdir()
    (folder / "disk.qcow2").touch()
    tap = tap_name(str(uuid.uuid4()))
    subprocess.run(["ip", "tuntap", "add", "dev", tap, "mode", "tap"], check=True)
    subprocess.run(["ip", "link", "set", tap, "master", NetworkConfig().nat_bridge], check=True)

    service.start()
    until(lambda: gone(pid) and leftovers(service.data_dir, vm) == [], "the orphan VM to go", 30)
    until(lambda: not folder.exists(), "the stray folder to go")
    until(lambda: tap not in links(), "the stray tap to go")
    assert service.http.get(f"/vms/{vm_id}").status_code == 404
