"""The package as a user installs it: built as a wheel, installed with its dependencies into a
fresh venv outside the repo, and run from there. The suite has no network, so the dependencies
come from the wheels that ``scripts/test`` downloaded before (``GOLDCLONE_WHEELHOUSE``): exactly
those pyproject.toml names, so a dependency missing from it fails here."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import prepared

pytestmark = pytest.mark.root

REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def wheelhouse() -> Path:
    return prepared("GOLDCLONE_WHEELHOUSE", "the folder of the wheels the package needs")


@pytest.fixture(scope="module")
def installed(workdir: Path, wheelhouse: Path) -> Iterator[Path]:
    """The bin folder of a fresh venv with the built wheel installed; no folder of the repo is
    on its path."""
    root = Path(tempfile.mkdtemp(prefix="wheel", dir=workdir))
    offline = ["--no-index", "--find-links", str(wheelhouse), "-q"]
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--no-deps", *offline, "-w", str(root / "dist"), str(REPO)],
                   check=True, cwd=root, env=_outside())  # fmt: skip
    wheel = next((root / "dist").glob("goldclone-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    bin_dir = root / "venv" / "bin"
    subprocess.run([bin_dir / "pip", "install", *offline, str(wheel)], check=True, cwd=root,
                   env=_outside())  # fmt: skip
    yield bin_dir


def _outside() -> dict[str, str]:
    """The environment without what would point Python at the repo's code."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def _run(bin_dir: Path, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    cwd = bin_dir.parents[1]  # outside the repo
    return subprocess.run([bin_dir / "goldclone", *argv], cwd=cwd, env={**_outside(), **env},
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_the_installed_package_is_the_wheel_not_the_repo(installed: Path) -> None:
    probe = [installed / "python", "-c", "import goldclone; print(goldclone.__file__)"]
    where = subprocess.run(probe, cwd=installed.parents[1], env=_outside(), capture_output=True,
                           text=True, check=True).stdout.strip()  # fmt: skip
    assert Path(where).is_relative_to(installed.parent) and not Path(where).is_relative_to(REPO)


def test_goldclone_version_prints_the_packages_version(installed: Path) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    result = _run(installed, "--version")
    assert result.returncode == 0, result.stderr
    assert version in result.stdout


def test_goldclone_doctor_runs_from_the_wheel(installed: Path, workdir: Path) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="wd", dir=workdir))
    result = _run(installed, "doctor", GOLDCLONE_DATA_DIR=str(data_dir))
    assert result.returncode == 0, result.stdout + result.stderr  # this host has what it needs
    for name in ("qemu", "qemu-img", "dnsmasq", "nftables", "kvm", "privileges", "data dir"):
        assert f" {name} " in result.stdout, result.stdout
    assert "Traceback" not in result.stderr


def test_the_demo_guest_builds_from_the_wheels_own_files(installed: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo.tar.gz"
    result = _run(installed, "demo-image", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == hashlib.sha256(out.read_bytes()).hexdigest()
