"""The ``goldclone`` command, run as a real program."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from goldclone import settings_sources
from tests.serving import GOLDCLONE, free_port, serve_until_answering

SYNTHETIC = {"GOLDCLONE_DRIVER": "synthetic"}
"""For the tests of ``serve``'s settings: the driver is not what they are about, and the
synthetic one needs no root."""


def test_demo_image_prints_the_checksum_last(tmp_path: Path) -> None:
    out = tmp_path / "demo.tar.gz"
    result = subprocess.run([*GOLDCLONE, "demo-image", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    last_line = result.stdout.strip().splitlines()[-1]
    assert last_line == hashlib.sha256(out.read_bytes()).hexdigest()


def test_serve_takes_port_and_data_dir_from_the_environment(workdir: Path) -> None:
    port, data_dir = free_port(), workdir / "cli-env"
    env = {"PORT": str(port), "GOLDCLONE_DATA_DIR": str(data_dir), "GOLDCLONE_HOST": "127.0.0.1",
           **SYNTHETIC}  # fmt: skip
    serve_until_answering([*GOLDCLONE, "serve"], env, port)
    assert (data_dir / "state.db").is_file()


def test_serve_options_win_over_the_environment(workdir: Path) -> None:
    port, data_dir = free_port(), workdir / "cli-opt"
    argv = [*GOLDCLONE, "serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir",
            str(data_dir)]  # fmt: skip
    serve_until_answering(
        argv, {"PORT": "1", "GOLDCLONE_DATA_DIR": "/nonexistent", **SYNTHETIC}, port
    )
    assert (data_dir / "state.db").is_file()


def test_a_bad_setting_is_a_clear_usage_error() -> None:
    result = subprocess.run(
        [*GOLDCLONE, "serve"], env={**os.environ, "PORT": "twelve"}, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "PORT='twelve'" in result.stderr and "Traceback" not in result.stderr


def test_settings_read_every_network_variable() -> None:
    settings = settings_sources.from_env(
        {
            "GOLDCLONE_NAT_BRIDGE": "natbr",
            "GOLDCLONE_NAT_SUBNET": "10.1.0.0/24",
            "GOLDCLONE_HOSTONLY_SUBNET": "10.2.0.0/24",
            "GOLDCLONE_BRIDGED_BRIDGE": "br0",
            "GOLDCLONE_IP_TIMEOUT": "7.5",
        }
    )
    assert settings.network.nat_bridge == "natbr"
    assert str(settings.network.nat_subnet) == "10.1.0.0/24"
    assert str(settings.network.hostonly_subnet) == "10.2.0.0/24"
    assert settings.network.bridged_bridge == "br0"
    assert settings.ip_timeout == 7.5
    with pytest.raises(ValueError, match="GOLDCLONE_NAT_SUBNET"):
        settings_sources.from_env({"GOLDCLONE_NAT_SUBNET": "10.1.0.1/33"})


def test_serving_beyond_loopback_without_tokens_warns_loudly(workdir: Path) -> None:
    def serve_on(host: str, env: dict[str, str]) -> str:
        port = free_port()
        argv = [*GOLDCLONE, "serve", "--host", host, "--port", str(port), "--data-dir",
                str(workdir / "cli-open")]  # fmt: skip
        return serve_until_answering(argv, env | SYNTHETIC, port)

    assert "WITHOUT authentication" in serve_on("0.0.0.0", {})
    assert "WITHOUT authentication" not in serve_on("127.0.0.1", {})
    tokens = {"GOLDCLONE_API_TOKENS": "a-token-of-sixteen-or-more"}
    assert "WITHOUT authentication" not in serve_on("0.0.0.0", tokens)


def test_serve_refuses_a_data_dir_too_long_for_sockets_in_one_line(workdir: Path) -> None:
    data_dir = workdir / ("d" * 80)
    argv = [*GOLDCLONE, "serve", "--port", str(free_port()), "--data-dir", str(data_dir)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("goldclone serve: the data dir ") and "too long" in line


def test_serve_without_vmrun_says_so_in_one_line(workdir: Path) -> None:
    env = {**os.environ, "GOLDCLONE_DRIVER": "vmware", "GOLDCLONE_VMRUN": "/nonexistent/vmrun"}
    argv = [*GOLDCLONE, "serve", "--port", str(free_port()), "--data-dir", str(workdir / "vmw")]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "goldclone serve: GOLDCLONE_VMRUN='/nonexistent/vmrun' is not an executable vmrun; fix "
        "the path, or unset it to look on PATH and in the usual install places"
    ]


def test_the_demo_banner_offers_no_command_that_its_url_policy_refuses(workdir: Path) -> None:
    port = free_port()
    argv = [*GOLDCLONE, "serve", "--demo", "--port", str(port), "--data-dir",
            str(workdir / "demo-banner")]  # fmt: skip
    env = {"GOLDCLONE_DRIVER": "synthetic"}
    refused = serve_until_answering(argv, {**env, "GOLDCLONE_ALLOW_PRIVATE_URLS": "false"}, port)
    assert "goldclone create" not in refused and "GOLDCLONE_ALLOW_PRIVATE_URLS is off" in refused
    allowed = serve_until_answering(argv, env, port)
    assert f"goldclone create http://127.0.0.1:{port}/demo/" in allowed


@pytest.mark.root  # its private network namespace: no package index can be reached
def test_the_set_up_starts_at_once_offline_when_nothing_is_missing() -> None:
    """A stamp older than pyproject.toml (a pull that changed it, say) sends the set-up to
    pip, which without the network retried each package five times; with every requirement
    installed already, nothing needs fetching."""
    repo = Path(__file__).parent.parent
    stamp = repo / ".venv" / ".installed"
    os.utime(stamp, (0, 0))
    done = subprocess.run([repo / "scripts" / "install-deps"], capture_output=True, text=True,
                          timeout=30)  # fmt: skip
    assert done.returncode == 0 and done.stderr == "", done
    assert stamp.stat().st_mtime > (repo / "pyproject.toml").stat().st_mtime
