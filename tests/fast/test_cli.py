"""The ``goldclone`` client commands as a user meets them: the real program, against a real
``goldclone serve`` on loopback (on the synthetic driver), in a pseudo-terminal where a
terminal matters. Each numbered test is an item of issue #13 that failed before."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from goldclone import __version__
from goldclone.cli.parser import build
from goldclone.client import APIError, Client
from goldclone.models import Status
from goldclone.server import listen
from goldclone.settings import Settings
from goldclone.store import schema
from tests.fast.conftest import image_of
from tests.servers import FileServer
from tests.serving import GOLDCLONE, ServerLog, free_port, in_pty, serving

EXIT_CODES = {0, 1, 2, 3, 4, 130, 141}


class Served:
    """A ``goldclone serve`` on the synthetic driver, and the CLI pointed at it."""

    def __init__(self, url: str, data_dir: Path, images: FileServer, log: ServerLog) -> None:
        self.url, self.data_dir, self.images, self.log = url, data_dir, images, log
        self.http = httpx.Client(base_url=url, timeout=30)

    def run(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``goldclone ARGS``, its output captured (so not on a terminal)."""
        environment = {**os.environ, "GOLDCLONE_URL": self.url, **(env or {})}
        return subprocess.run([*GOLDCLONE, *args], env=environment, capture_output=True,
                              text=True, timeout=120)  # fmt: skip

    def image_args(self, name: str = "disk.raw") -> list[str]:
        image = image_of(self.images, name)
        return [image["url"], "--checksum", image["checksum"], "--cpus", "1", "--memory", "256"]

    def held_image_args(self, name: str) -> list[str]:
        """Those of image ``name``, whose download never ends: each test holds its own, since
        the server sees a held download fail after a minute, and keeps that an hour."""
        [_, *rest] = self.image_args(name)
        return [self.images.url(f"hold/{name}"), *rest]

    def vms(self) -> list[dict[str, Any]]:
        vms: list[dict[str, Any]] = self.http.get("/vms").json()["vms"]
        return vms

    def boot(self) -> dict[str, Any]:
        done = self.run("create", *self.image_args(), "--wait", "--json")
        assert done.returncode == 0, done.stderr
        vm: dict[str, Any] = json.loads(done.stdout)
        return vm


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The server, and the images it fetches: ``held-*.raw`` are only ever asked for through
    ``/hold/``, so that their download never ends (and a VM of one stays ``creating``)."""
    root = tmp_path_factory.mktemp("cli")
    served = root / "served"
    served.mkdir()
    for fill, name in enumerate(("disk.raw", "other.raw", "pulled.raw", "held-2.raw",
                                 "held-11.raw")):  # fmt: skip
        disk = bytearray(bytes([fill]) * 65536)
        disk[510:512] = b"\x55\xaa"
        (served / name).write_bytes(bytes(disk))
    port, data_dir = free_port(), root / "data"
    env = {"GOLDCLONE_DRIVER": "synthetic", "GOLDCLONE_DATA_DIR": str(data_dir),
           "PORT": str(port), "GOLDCLONE_DOWNLOAD_TIMEOUT": "600"}  # fmt: skip
    with FileServer(served).running() as files, serving([*GOLDCLONE, "serve"], env, port) as log:
        served_cli = Served(f"http://127.0.0.1:{port}", data_dir, files, log)
        with served_cli.http:
            yield served_cli


@pytest.fixture
def cli(served: Served) -> Iterator[Served]:
    yield served
    for vm in served.vms():
        served.http.delete(f"/vms/{vm['id']}")


def test_the_log_has_one_line_per_event_and_no_librarys_chatter(cli: Served) -> None:
    cli.boot()  # a download, a VM
    lines = cli.log.text().splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\dT[\d:.]+Z (DEBUG|INFO|WARNING|ERROR) ", line)
               for line in lines), lines  # fmt: skip
    assert [line for line in lines if " alembic" in line or " httpx" in line] == []
    migrated = [line for line in lines if "schema" in line]
    assert len(migrated) == 1 and migrated[0].endswith(
        f"migrating the store's schema from revision none (a new database) to {schema.head()}"
    )


def test_1_create_wait_prints_the_id_first(cli: Served) -> None:
    done = cli.run("create", *cli.image_args(), "--wait")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    [vm] = cli.vms()
    assert lines[0] == f"created VM {vm['id']}"
    assert lines[-1] == vm["ip_address"]


def test_2_ctrl_c_during_create_wait_says_the_vm_goes_on(cli: Served) -> None:
    argv = [*GOLDCLONE, "create", *cli.held_image_args("held-2.raw"), "--wait"]
    env = {**os.environ, "GOLDCLONE_URL": cli.url}
    shown, code = in_pty(argv, env, until="created VM")
    [vm] = cli.vms()
    assert code == 130, shown
    assert "Traceback" not in shown and "KeyboardInterrupt" not in shown
    assert f"VM {vm['id']} goes on being created" in shown
    assert f"goldclone delete {vm['id']}" in shown
    assert vm["status"] == "creating"


def test_3_delete_deletes_every_id_and_reports_each_failure(cli: Served) -> None:
    first, second = cli.boot(), cli.boot()
    done = cli.run("delete", first["id"], "no-such-vm", second["id"])
    assert done.returncode == 1
    assert cli.vms() == []
    assert done.stdout.splitlines() == [f"deleted {first['id']}", f"deleted {second['id']}"]
    assert done.stderr.splitlines() == [
        "goldclone delete: no-such-vm: vm-not-found: The requested virtual machine ID was not found"
    ]
    done = cli.run("delete", "no-such-vm", "--json")
    assert json.loads(done.stdout)["failed"][0]["id"] == "no-such-vm"
    assert json.loads(done.stderr) == {"code": "vm-not-found", "id": "no-such-vm",
        "message": "The requested virtual machine ID was not found"}  # fmt: skip
    done = cli.run("delete")
    assert (done.returncode, done.stderr.splitlines()) == (2, [
        "goldclone delete: give the IDs of the VMs to delete, or --label KEY=VALUE"
    ])  # fmt: skip


def test_the_client_filters_by_statuses_given_as_names(cli: Served) -> None:
    vm = cli.boot()
    with Client(cli.url) as client:
        assert [found.id for found in client.list_vms(None, ["running", "creating"])] == [vm["id"]]
        assert client.list_vms({}, [Status.ERROR, "stopped"]) == []
        with pytest.raises(APIError) as refused:
            client.list_vms(None, ["no-such-status"])
    assert refused.value.status == 400 and "status" in refused.value.message


def test_4_options_override_the_request_file_field_by_field(cli: Served, tmp_path: Path) -> None:
    image = image_of(cli.images, "other.raw")
    sha1 = hashlib.sha1((cli.images.root / "other.raw").read_bytes()).hexdigest()
    body = {"image": {"url": "http://127.0.0.1:9/moved.raw", "checksum": sha1,
                      "checksum_type": "sha1"}, "cpus": 1, "memory": 256}  # fmt: skip
    request = tmp_path / "create.json"
    request.write_text(json.dumps(body))
    done = cli.run("create", "--from", str(request), image["url"], "--memory", "512", "--json")
    assert done.returncode == 0, done.stderr
    vm = json.loads(done.stdout)
    assert vm["image"] == {"url": image["url"], "checksum": sha1, "checksum_type": "sha1"}
    assert (vm["cpus"], vm["memory"]) == (1, 512)
    done = cli.run("create", "--from", str(request), image["url"], "--checksum",
                   image["checksum"], "--checksum-type", "sha256", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["image"]["checksum"] == image["checksum"]


def test_5_broken_json_says_where(cli: Served, tmp_path: Path) -> None:
    request = tmp_path / "create.json"
    request.write_text('{\n  "cpus": 1,\n  "memory": 256,\n}\n')  # the original README's comma
    done = cli.run("create", "--from", str(request))
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"goldclone create: {request} is not valid JSON: Expecting property name enclosed in "
        "double quotes at line 4, column 1"
    )


def test_6_no_traceback_when_the_output_is_closed_early(cli: Served) -> None:
    for _ in range(3):
        cli.boot()
    environment = {**os.environ, "GOLDCLONE_URL": cli.url}
    message = "the output was closed before all of it was written"
    for args in (["list", "--json"], ["list", "-q"], ["list"], ["images"]):
        read, write = os.pipe()
        os.close(read)  # as `| head` does once it has its lines
        done = subprocess.run([*GOLDCLONE, *args], env=environment, stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=60)  # fmt: skip
        os.close(write)
        assert done.returncode == 141, (args, done.stderr)
        if "--json" in args:
            assert done.stderr.splitlines() == [
                f'{{"code": "broken-pipe", "message": "{message}"}}'
            ]
        else:
            assert done.stderr.splitlines() == [f"goldclone {args[0]}: {message}"], args


def test_serve_on_a_port_in_use_says_so_in_one_line_and_does_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "GOLDCLONE_DRIVER": "synthetic", "GOLDCLONE_DATA_DIR": str(data_dir),
               "GOLDCLONE_HOST": "127.0.0.1", "PORT": str(port)}  # fmt: skip
        done = subprocess.run([*GOLDCLONE, "serve"], env=env, capture_output=True, text=True,
                              timeout=60)  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"goldclone serve: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]
    assert not data_dir.exists()  # no migration, nothing made


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_the_api_listens_on_tcp_by_name_so_that_asyncio_turns_nagle_off(host: str) -> None:
    """A socket of protocol 0 served every answer about 40 ms late (Nagle's algorithm and the
    client's delayed ACK): the fuzzer took five times as long."""
    with listen(Settings(host=host, port=0)) as sock:
        assert sock.proto == socket.IPPROTO_TCP


def test_6_demo_image_into_a_missing_folder_is_one_line(tmp_path: Path) -> None:
    done = subprocess.run([*GOLDCLONE, "demo-image", str(tmp_path / "none" / "x.tar.gz")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"goldclone demo-image: cannot write {tmp_path}/none/x.tar.gz: No such file or directory"
    ]


def test_a_usage_error_is_argparses_two_lines_or_with_json_one_object() -> None:
    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*GOLDCLONE, *argv], capture_output=True, text=True, timeout=60)

    for argv, message in (
        (["list", "--no-such-option"], "unrecognized arguments: --no-such-option"),
        (["get"], "the following arguments are required: id"),
        (["create", "--timeout", "x"], "argument --timeout: expected seconds, got 'x'"),
    ):
        done = run(*argv)
        assert done.returncode == 2, done
        assert done.stderr.splitlines()[0].startswith("usage: goldclone"), done.stderr
        assert done.stderr.splitlines()[-1].endswith(f": error: {message}"), done.stderr
        done = run(*argv, "--json")
        assert done.returncode == 2 and done.stdout == "", done
        assert [json.loads(line) for line in done.stderr.splitlines()] == [
            {"code": "usage-error", "message": message}
        ]


def test_6_no_command_shows_a_traceback_for_bad_input(cli: Served) -> None:
    """Every command and action the parser has, with an unknown ID (also with ``--json``) at
    the server and where no server is, and with an unknown option."""
    subcommands = build()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    with_actions = ("images", "hosts", "pools", "templates")
    commands = [[name] for name in subcommands if name not in (*with_actions, "demo-image")]
    for name in with_actions:
        actions = subcommands[name]._subparsers._group_actions[0].choices  # type: ignore[union-attr]
        commands += [[name, action] for action in actions]
    runs = [
        ([*command, *args], url)
        for command in commands
        for args, url in (
            (["no-such-id"], cli.url),
            (["no-such-id", "--json"], "http://127.0.0.1:9"),
            (["--no-such-option"], cli.url),
        )
    ]
    with ThreadPoolExecutor(4) as pool:
        done = list(pool.map(lambda run: cli.run(*run[0], env={"GOLDCLONE_URL": run[1]}), runs))
    for (argv, url), result in zip(runs, done, strict=True):
        said = f"{argv} at {url}: {result.returncode} {result.stderr}"
        assert "Traceback" not in result.stderr + result.stdout, said
        assert result.returncode in EXIT_CODES and result.returncode != 0, said
        assert result.stderr.strip().splitlines()[-1].startswith(("goldclone", "{")), said


def test_hosts_lists_this_one_and_refuses_to_forget_a_host_that_is_up(cli: Served) -> None:
    done = cli.run("hosts", "--json")
    assert done.returncode == 0, done.stderr
    [host] = json.loads(done.stdout)["hosts"]
    assert host["state"] == "up" and host["driver"] == "synthetic"
    [header, row] = cli.run("hosts").stdout.splitlines()
    assert header.split()[:3] == ["ID", "STATE", "VMS"] and row.split()[:3] == [
        host["id"],
        "up",
        "0",
    ]
    refused = cli.run("hosts", "forget", host["id"])
    assert refused.returncode == 1 and "host-up" in refused.stderr


def test_7_nothing_is_wrapped_when_not_on_a_terminal(cli: Served) -> None:
    label = "team=" + "x" * 60
    done = cli.run("create", *cli.image_args(), "--label", label, "--name", "a" * 63, "--wait")
    assert done.returncode == 0, done.stderr
    [vm] = cli.vms()
    rows = cli.run("list").stdout.splitlines()
    assert len(rows) == 2 and vm["id"] in rows[1] and label in rows[1]
    wrong = "0" * 64
    done = cli.run("create", cli.images.url("disk.raw"), "--checksum", wrong, "--wait")
    [message] = done.stderr.splitlines()
    assert wrong in message and "checksum-mismatch" in message


def test_8_a_failed_download_under_wait_ends_with_its_error(cli: Served) -> None:
    unknown = "ab" * 32  # no image has it: a download is needed, and it fails
    done = cli.run("create", cli.images.url("missing.raw"), "--checksum", unknown, "--wait")
    assert done.returncode == 1
    phases = [line.split()[1] for line in done.stdout.splitlines()[1:]]
    assert phases == ["accepted", "downloading", "error"], done.stdout
    assert "download-failed" in done.stderr


def test_a_failed_download_on_a_terminal_leaves_no_progress_bar_below_it(
    served: Served, tmp_path: Path
) -> None:
    port, data_dir = free_port(), tmp_path / "data"
    env = {"GOLDCLONE_DRIVER": "synthetic", "GOLDCLONE_DATA_DIR": str(data_dir),
           "PORT": str(port), "GOLDCLONE_DOWNLOAD_TIMEOUT": "2"}  # fmt: skip
    with serving([*GOLDCLONE, "serve"], env, port):
        [_, *rest] = served.image_args("other.raw")
        argv = [*GOLDCLONE, "create", served.images.url("hold/other.raw"), *rest, "--wait"]
        shown, code = in_pty(argv, {**os.environ, "GOLDCLONE_URL": f"http://127.0.0.1:{port}"})
    assert code == 1
    assert "/65.5 kB" in shown, shown  # the bar, while the download went on
    after = shown.rsplit("error", 1)[1]
    assert "kB" not in after and "download-failed" in after, after


def test_9_images_pull_wait_follows_the_download_and_fails_with_it(cli: Served) -> None:
    image = image_of(cli.images, "pulled.raw")
    done = cli.run("images", "pull", cli.images.url("missing.raw"), "--checksum",
                   image["checksum"], "--wait")  # fmt: skip
    assert done.returncode == 1
    assert "download-failed" in done.stderr and "✗ error" in done.stdout
    failed = f"sha256-{image['checksum']}"
    deleted = cli.run("images", "delete", "--failed").stdout.splitlines()
    assert f"deleted {failed}" in deleted  # with those that other tests' fetches left
    assert failed not in cli.run("images").stdout
    assert cli.run("images", "delete").returncode == 2
    done = cli.run("images", "pull", image["url"], "--checksum", image["checksum"], "--wait")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"sha256-{image['checksum']}"
    assert "✓ ready" in done.stdout


def test_create_asks_for_the_vm_to_go_at_its_power_off(cli: Served) -> None:
    done = cli.run("create", *cli.image_args(), "--on-poweroff", "delete", "--wait", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["on_poweroff"] == "delete"


def test_10_get_shows_the_whole_vm(cli: Served) -> None:
    vm = cli.boot()
    done = cli.run("get", vm["id"])
    assert done.returncode == 0, done.stderr
    fields = {line.split("  ", 1)[0]: line.split("  ", 1)[1].strip()
              for line in done.stdout.split("\n\n")[0].splitlines()}  # fmt: skip
    assert fields["mac address"] == vm["mac_address"]
    assert fields["ip address"] == vm["ip_address"]
    assert vm["image"]["url"] in fields["image"] and vm["image"]["checksum"] in fields["image"]
    assert fields["network"] == "nat" and fields["started from"] == "cold"
    assert fields["created"] == vm["created_at"]  # both to the second
    assert fields["expires"] == vm["expires_at"][:19] + "Z"
    timeline = done.stdout.split("\n\n")[1].splitlines()
    assert timeline[0].split() == ["PHASE", "AT", "+", "TOOK"]
    assert [row.split()[0] for row in timeline[1:]] == [e["phase"] for e in vm["timeline"]]


def test_11_timeouts_have_a_unit_a_default_and_their_own_exit_code(cli: Served) -> None:
    assert "give up after this long (default: 600)" in cli.run("wait", "--help").stdout
    assert cli.run("wait", "some-id", "--timeout", "-1").returncode == 2
    started = time.monotonic()
    done = cli.run("create", *cli.held_image_args("held-11.raw"), "--wait", "--timeout", "1")
    assert done.returncode == 4, done.stderr
    assert time.monotonic() - started < 30
    [vm] = cli.vms()
    assert done.stderr.strip() == f"goldclone create: VM {vm['id']} is still creating after 1 s"
    done = cli.run("ip", vm["id"])
    assert done.returncode == 1
    assert done.stderr.strip() == (f"goldclone ip: no-ip: VM {vm['id']} has no IP address (it is "
                                   "creating); --wait waits for one")  # fmt: skip
    for command in ("create", "wait", "list", "delete", "images", "serve"):
        assert "\n  4    a wait timed out" in cli.run(command, "--help").stdout


def test_12_field_errors_are_named_alike_without_pydantic_s_words(cli: Served) -> None:
    done = cli.run("create", cli.images.url("disk.raw"), "--checksum", "zz")
    assert done.returncode == 2
    assert done.stderr.startswith("goldclone create: image.checksum: ")
    assert "Value error" not in done.stderr


def test_version_quiet_list_ip_and_logs(cli: Served) -> None:
    version = cli.run("--version")
    assert version.returncode == 0
    assert version.stdout.strip() == f"goldclone {__version__}"
    first, second = cli.boot(), cli.boot()
    assert sorted(cli.run("list", "-q").stdout.split()) == sorted([first["id"], second["id"]])
    assert cli.run("ip", first["id"]).stdout.strip() == first["ip_address"]
    console = cli.data_dir / "vms" / first["id"] / "console.log"
    console.write_text("goldclone-guest: up\nlogin:\n")
    done = cli.run("logs", first["id"])
    assert (done.returncode, done.stdout) == (0, "goldclone-guest: up\nlogin:\n")
    assert cli.run("logs", "no-such-vm").returncode == 1


def test_bash_completion_completes_commands_options_and_vms(cli: Served, tmp_path: Path) -> None:
    vm = cli.boot()
    named = cli.run("create", *cli.image_args(), "--name", "web-1", "--wait", "--json")
    assert named.returncode == 0, named.stderr
    script = subprocess.run([*GOLDCLONE, "completion", "bash"], capture_output=True, text=True)
    assert script.returncode == 0
    (tmp_path / "completion.bash").write_text(script.stdout)
    bin_dir = Path(sys.executable).parent
    probe = f"""
source {tmp_path}/completion.bash
complete_words() {{
    COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); COMP_LINE="$*"; COMP_POINT=${{#COMP_LINE}}
    COMPREPLY=(); _python_argcomplete goldclone; printf '%s\\n' "${{COMPREPLY[@]}}"
}}
complete_words goldclone cr
echo ---
complete_words goldclone create --che
echo ---
complete_words goldclone get we
echo ---
complete_words goldclone delete {vm["id"][:6]}
"""
    path = f"{bin_dir}:{os.environ['PATH']}"
    done = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": path, "GOLDCLONE_URL": cli.url})  # fmt: skip
    commands, options, names, ids = done.stdout.split("---\n")
    assert commands.split() == ["create"], done.stderr
    assert sorted(options.split()) == ["--checksum", "--checksum-type"], done.stderr
    assert names.split() == ["web-1"], done.stderr
    assert vm["id"] in ids.split(), done.stderr
    for shell in ("zsh", "fish"):
        done = subprocess.run([*GOLDCLONE, "completion", shell], capture_output=True, text=True)
        assert done.returncode == 0 and "goldclone" in done.stdout


def test_every_command_takes_a_vms_name_or_the_start_of_its_id(cli: Served) -> None:
    made = cli.run("create", *cli.image_args(), "--name", "web-1", "--wait", "--json")
    vm = json.loads(made.stdout)
    assert cli.run("ip", vm["id"][:8]).stdout.strip() == vm["ip_address"]
    assert json.loads(cli.run("get", "web-1", "--json").stdout)["id"] == vm["id"]
    assert cli.run("renew", "web-1", "--ttl", "600").returncode == 0
    assert cli.run("wait", vm["id"][:8]).returncode == 0
    done = cli.run("delete", "web-1")
    assert done.returncode == 0 and done.stdout.strip() == "deleted web-1"
    assert cli.vms() == []


def test_pools_and_templates_are_made_listed_and_deleted_from_the_cli(cli: Served) -> None:
    cli.boot()  # the image, fetched
    image_id = f"sha256-{image_of(cli.images)['checksum']}"
    done = cli.run("templates", "create", image_id, "--cpus", "1", "--memory", "256",
                   "--disk-size", "1", "--wait", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    template = json.loads(done.stdout)
    assert template["status"] == "ready" and template["image_id"] == image_id
    listed = json.loads(cli.run("templates", "--json").stdout)["templates"]
    assert [t["id"] for t in listed] == [template["id"]]
    assert json.loads(cli.run("templates", "list", image_id, "--json").stdout) == {
        "templates": listed
    }
    [row] = [line for line in cli.run("images").stdout.splitlines() if image_id in line]
    assert row.split()[-2] == "1x256MBx1GiB", row  # TEMPLATES, before the URL

    done = cli.run("pools", "set", "warm", *cli.image_args(), "--disk-size", "1", "--size", "1",
                   "--wait")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "warm ready (1 of 1 ready)"
    [header, row] = cli.run("pools").stdout.splitlines()
    assert header.split()[:3] == ["NAME", "STATUS", "READY"] and row.split()[:3] == [
        "warm", "ready", "1/1",
    ]  # fmt: skip
    refused = cli.run("templates", "delete", image_id, template["id"])
    assert refused.returncode == 1 and "template-in-use" in refused.stderr, refused.stderr
    claimed = cli.run("create", *cli.image_args(), "--disk-size", "1", "--wait", "--json")
    vm = json.loads(claimed.stdout)
    assert (vm["started_from"], vm["disk_size"]) == ("pool", 1), vm
    assert cli.run("delete", vm["id"]).returncode == 0
    assert cli.run("pools", "delete", "warm").stdout.strip() == "deleted warm"
    assert json.loads(cli.run("pools", "--json").stdout) == {"pools": []}
    done = cli.run("templates", "delete", image_id, template["id"])
    assert done.returncode == 0 and done.stdout.strip() == f"deleted {template['id']}"
    assert json.loads(cli.run("templates", "--json").stdout) == {"templates": []}
    unknown = cli.run("pools", "delete", "warm")
    assert unknown.returncode == 1 and "pool-not-found" in unknown.stderr
    assert cli.run("pools", "set", "warm").returncode == 2  # no image


def test_the_cli_acts_as_its_tokens_tenant_and_role(tmp_path: Path, served: Served) -> None:
    """A server with named tokens: the CLI, given each token, sees and changes only what its
    tenant and role may, and says so without a traceback."""
    secrets = {"alice": "alice-cli-secret-0123", "bob": "bob-cli-secret-012345",
               "alice-reader": "reader-cli-secret-0123"}  # fmt: skip
    roles = {"alice": ("user", "team-a"), "bob": ("user", "team-b"),
             "alice-reader": ("read", "team-a")}  # fmt: skip
    tokens = {name: {"sha256": hashlib.sha256(secret.encode()).hexdigest(), "role": role,
                     "tenant": tenant}
              for name, (role, tenant) in roles.items() for secret in [secrets[name]]}  # fmt: skip
    port = free_port()
    env = {"GOLDCLONE_DRIVER": "synthetic", "GOLDCLONE_DATA_DIR": str(tmp_path / "data"),
           "PORT": str(port), "GOLDCLONE_TOKENS": json.dumps(tokens)}  # fmt: skip
    with serving([*GOLDCLONE, "serve"], env, port) as log:
        cli = Served(f"http://127.0.0.1:{port}", tmp_path / "data", served.images, log)

        def as_(name: str, *args: str) -> subprocess.CompletedProcess[str]:
            return cli.run(*args, env={"GOLDCLONE_TOKEN": secrets[name]})

        made = as_("alice", "create", *cli.image_args(), "--wait", "--json")
        assert made.returncode == 0, made.stderr
        vm = json.loads(made.stdout)
        assert vm["tenant"] == "team-a"
        assert as_("bob", "list", "-q").stdout.split() == []
        assert as_("alice-reader", "list", "-q").stdout.split() == [vm["id"]]
        for name, args, code, said in (
            ("bob", ("get", vm["id"]), 1, "vm-not-found"),
            ("bob", ("delete", vm["id"]), 1, "vm-not-found"),
            ("alice-reader", ("delete", vm["id"]), 1, "forbidden"),
        ):
            done = as_(name, *args)
            assert (done.returncode, "Traceback" in done.stderr) == (code, False), done.stderr
            assert said in done.stderr, done.stderr
            assert secrets[name] not in done.stderr + done.stdout
        assert as_("alice", "delete", vm["id"]).returncode == 0


def test_a_vm_made_into_an_image_starts_a_vm_by_the_images_id(cli: Served) -> None:
    vm = cli.boot()
    built = cli.run("images", "build", vm["id"], "--name", "ci base", "--json")
    assert built.returncode == 0, built.stderr
    image_id = json.loads(built.stdout)["id"]
    again = cli.run("create", image_id, "--cpus", "1", "--memory", "256", "--wait", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["image"] == {"id": image_id}
    refused = cli.run("create", image_id, "--checksum", "ab")
    assert refused.returncode == 2 and "takes no --checksum" in refused.stderr
