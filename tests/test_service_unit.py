"""contrib/goldclone.service: systemd accepts it, and the service runs a guest with no more
privileges than the unit leaves it (its capability bounding set, no new privileges)."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from goldclone import settings_sources
from goldclone.drivers.qemu.network import Networks
from goldclone.settings import Settings
from tests.conftest import checksum
from tests.servers import FileServer
from tests.serving import GOLDCLONE, free_port, serving

pytestmark = pytest.mark.root

CONTRIB = Path(__file__).parents[1] / "contrib"
UNIT = CONTRIB / "goldclone.service"
INSTALLED = "/opt/goldclone/bin/goldclone"
BOOT_TIMEOUT = 180.0


def _directive(name: str) -> str:
    found = re.search(rf"^{name}=(.*)$", UNIT.read_text(), re.MULTILINE)
    assert found, f"the unit has no {name}="
    return found[1]


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    # verify needs ExecStart's program to exist: the one of this venv stands in for it
    program = Path(sys.executable).parent / "goldclone"
    assert program.is_file() and INSTALLED in _directive("ExecStart")
    unit = tmp_path / "goldclone.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED, str(program)))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                            capture_output=True, text=True)  # fmt: skip
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_the_unit_serves_the_example_config_and_keeps_guests_across_restarts() -> None:
    assert _directive("ExecStart") == f"{INSTALLED} serve --config /etc/goldclone/goldclone.toml"
    assert _directive("KillMode") == "process"
    assert _directive("StateDirectory") == "goldclone"
    settings = settings_sources.load(CONTRIB / "goldclone.toml", {})
    assert settings.data_dir == Path("/var/lib/goldclone")


def test_a_guest_boots_with_only_the_units_privileges(
    workdir: Path, file_server: FileServer, demo_package: Path
) -> None:
    caps = ",".join(f"+{cap.removeprefix('CAP_').lower()}" for cap in
                    _directive("CapabilityBoundingSet").split())  # fmt: skip
    assert _directive("NoNewPrivileges") == "yes"
    confined = ["setpriv", f"--bounding-set=-all,{caps}", f"--inh-caps=-all,{caps}",
                "--no-new-privs", "--"]  # fmt: skip
    data_dir, port = Path(tempfile.mkdtemp(prefix="unit", dir=workdir)), free_port()
    env = {"GOLDCLONE_DATA_DIR": str(data_dir), "PORT": str(port), "GOLDCLONE_HOST": "127.0.0.1"}
    body = {
        "image": {"url": file_server.url("demo.tar.gz"), "checksum": checksum(demo_package)},
        "cpus": 1,
        "memory": 256,
    }
    try:
        with (
            serving([*confined, *GOLDCLONE, "serve"], env, port) as log,
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as api,
        ):
            created = api.post("/vms", json=body)
            assert created.status_code == 202, created.text
            vm_id = created.json()["id"]
            try:
                vm = _until_not_creating(api, vm_id)
                assert vm["status"] == "running", (vm, log.text())
                page = httpx.get(f"http://{vm['ip_address']}/", timeout=30).text
                assert "goldclone demo guest" in page
                pid = int((data_dir / "vms" / vm_id / "qemu.pid").read_text())
                assert _uid(pid) == 65534  # QEMU dropped to nobody
            finally:  # guests outlive the service, so a failed test still deletes its own
                assert api.delete(f"/vms/{vm_id}").status_code == 204
            assert _uid(pid) is None  # DELETE answers once the guest is gone
    finally:
        asyncio.run(Networks(Settings().network, data_dir / "networks").teardown())
        shutil.rmtree(data_dir, ignore_errors=True)


def _until_not_creating(api: httpx.Client, vm_id: str) -> dict[str, object]:
    deadline = time.monotonic() + BOOT_TIMEOUT
    while True:
        vm: dict[str, object] = api.get(f"/vms/{vm_id}", params={"wait": "true"}).json()
        if vm["status"] != "creating" or time.monotonic() > deadline:
            return vm


def _uid(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE)
    return int(found[1]) if found and "State:\tZ" not in status else None
