"""The ``goldclone`` command line: every command and option, in one parser (which also drives
shell completion). What the commands do is in ``goldclone.cli.commands``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from goldclone import __version__
from goldclone.cli import exits
from goldclone.cli.commands.host import settings_help
from goldclone.exec_protocol import TIMED_OUT_EXIT
from goldclone.models import Status

DESCRIPTION = """goldclone: disposable linked-clone VMs from verified gold images.

`goldclone serve` runs the server; the other commands are its client. They talk to the
server at --url (or GOLDCLONE_URL), with the bearer token in GOLDCLONE_TOKEN if the server
needs one."""
CHECKSUM_TYPES = ("md5", "sha1", "sha256", "sha512")
DEFAULT_CREATE_TIMEOUT = 3600
DEFAULT_WAIT_TIMEOUT = 600
SHELLS = ("bash", "zsh", "fish")
COMPLETION_TIMEOUT = 2.0
"""Seconds a shell's completion waits for the server's list of VMs."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows an option's default after its help, where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            text
            and "default" not in text
            and default not in (None, False, [], argparse.SUPPRESS)
            and action.option_strings
        ):
            text += " (default: %(default)s)"
        return text


def seconds(text: str) -> float:
    """A positive number of seconds, for ``--timeout``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


class BadUsage(Exception):
    """Arguments that the parser refuses: ``message``, and the usage of the (sub)command
    they were given to."""

    def __init__(self, usage: str, prog: str, message: str) -> None:
        super().__init__(message)
        self.usage, self.prog, self.message = usage, prog, message


class _Parser(argparse.ArgumentParser):
    """A parser whose epilog may be made only when its help is shown (``serve``'s lists
    every setting, which a client command must not pay for loading), and whose errors are
    raised (``BadUsage``) for ``main`` to show, as JSON with ``--json``."""

    epilog_from: Callable[[], str] | None = None

    def format_help(self) -> str:
        if self.epilog_from is not None:
            self.epilog = f"{self.epilog_from()}\n\n{exits.HELP}"
        return super().format_help()

    def error(self, message: str) -> NoReturn:
        raise BadUsage(self.format_usage(), self.prog, message)


def build() -> argparse.ArgumentParser:
    parser = _command(None, "goldclone", DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"goldclone {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    client = _client_options()

    serve = _command(commands, "serve", "serve the HTTP API")
    serve.epilog_from = settings_help
    serve.add_argument("--host", help="address to listen on (GOLDCLONE_HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (PORT)")
    serve.add_argument("--data-dir", type=Path, help="state and images (GOLDCLONE_DATA_DIR)")
    _config_option(serve)
    serve.add_argument("--demo", action="store_true",
                       help="build the demo guest and serve it at /demo/")  # fmt: skip

    doctor = _command(commands, "doctor", "check that this host can run goldclone, and say "
                                          "what to fix")  # fmt: skip
    doctor.add_argument("--data-dir", type=Path, help="the data dir to check")
    _config_option(doctor)
    _json_option(doctor)

    demo = _command(commands, "demo-image", "build the tiny demo guest as an image package")
    demo.add_argument("out", type=Path, help="where to write the .tar.gz")
    _json_option(demo)

    completion = _command(
        commands, "completion", "print a shell completion script (`goldclone completion --help`)"
    )
    completion.add_argument(
        "shell",
        choices=SHELLS,
        help="load it with `source <(goldclone completion bash)` (zsh alike), or with "
        "`goldclone completion fish | source`",
    )

    create = _command(commands, "create", "create a VM", client)
    _image_and_shape(create, "the server's, ")
    create.add_argument("--callback-url", help="POSTed to when the VM runs or fails")
    create.add_argument("--gui", action="store_true", help="give the VM a display")
    create.add_argument("--name", help="the VM's name and the guest's hostname (a DNS label)")
    create.add_argument("--ssh-key", dest="ssh_keys", type=Path, action="append",
                        metavar="FILE", help="an OpenSSH public key file (.pub); "
                        "repeatable")  # fmt: skip
    create.add_argument("--user-data", type=Path, metavar="FILE",
                        help="cloud-init user data: a #cloud-config file or a #! "
                        "script")  # fmt: skip
    create.add_argument("--metadata", action="append", metavar="KEY=VALUE",
                        help="metadata the guest can read; repeatable")  # fmt: skip
    create.add_argument("--ready-when", metavar="JSON",
                        help='what "ready" means, e.g. \'{"tcp": 22}\'')  # fmt: skip
    create.add_argument("--start", choices=["auto", "cold"],
                        help="cold: boot, even if a template or pool could start it")  # fmt: skip
    create.add_argument("--on-poweroff", choices=["stop", "delete"],
                        help="delete: the VM is deleted when its guest powers itself off, as "
                        "a CI job's last step (default: stop)")  # fmt: skip
    create.add_argument("--ttl", type=int, metavar="SECONDS",
                        help="its lease: destroyed this long from now unless renewed "
                        "(default: the server's)")  # fmt: skip
    create.add_argument("--label", dest="labels", action="append", metavar="KEY=VALUE",
                        help="a label; repeatable")  # fmt: skip
    create.add_argument("--from", dest="from_file", type=Path, metavar="FILE",
                        help="a JSON request body, as the original project's files; the "
                        "options above win over its fields, one by one")  # fmt: skip
    _wait_options(create, DEFAULT_CREATE_TIMEOUT, "wait until it runs, showing progress")

    get = _command(commands, "get", "show everything about a VM", client)
    _vm_argument(get, "id")
    ip = _command(commands, "ip", "print a VM's IP address", client)
    _vm_argument(ip, "id")
    _wait_options(ip, DEFAULT_WAIT_TIMEOUT, "wait until it has one")

    ssh = _command(commands, "ssh", "log in to a VM with ssh, or run a command there: "
                   "goldclone ssh ID [OPTIONS] [-- COMMAND...]", client)  # fmt: skip
    _vm_argument(ssh, "id")
    ssh.add_argument("--user", default="root",
                     help="the account; Debian's cloud images want debian")  # fmt: skip
    ssh.add_argument("--identity", "-i", type=Path, metavar="FILE",
                     help="the private key (default: ssh's own choice)")  # fmt: skip

    run = _command(commands, "exec", "run a command in a VM's guest, with this terminal's "
                   "stdin, stdout and stderr, and exit with its exit code: "
                   "goldclone exec ID [OPTIONS] -- COMMAND...", client)  # fmt: skip
    _vm_argument(run, "id")
    run.add_argument("--tty", "-t", action="store_true",
                     help="run it on a terminal of this one's size (stdout and stderr are "
                     "then one stream)")  # fmt: skip
    run.add_argument("--env", "-e", action="append", default=[], metavar="NAME=VALUE",
                     help="an environment variable for it; repeatable")  # fmt: skip
    run.add_argument("--cwd", "-w", metavar="DIR", help="where it runs (default: the home)")
    run.add_argument("--timeout", type=float, metavar="SECONDS",
                     help=f"kill it after this long (exit {TIMED_OUT_EXIT})")  # fmt: skip

    copy = _command(commands, "cp", "copy a file or folder to or from a VM's guest, modes "
                    "kept: goldclone cp LOCAL ID:PATH, or goldclone cp ID:PATH LOCAL (a PATH "
                    "that ends with / takes it inside, with its own name)", client)  # fmt: skip
    copy.add_argument("source", help="LOCAL or ID:PATH")
    copy.add_argument("target", help="ID:PATH or LOCAL")

    forwarding = _command(commands, "port-forward", "forward a local port to a port of a VM's "
                          "guest through the API, until Ctrl-C: goldclone port-forward ID "
                          "[LOCAL:]REMOTE (LOCAL 0: any free one, printed)", client)  # fmt: skip
    _vm_argument(forwarding, "id")
    forwarding.add_argument("ports", metavar="[LOCAL:]REMOTE")
    forwarding.add_argument("--address", default="127.0.0.1",
                            help="the local address to listen on")  # fmt: skip

    gitlab = _command(commands, "gitlab-executor", "GitLab Runner's custom executor: a VM per "
                      "job (docs/ci.md); the runner calls each stage", client)  # fmt: skip
    gitlab.add_argument("stage", choices=["config", "prepare", "run", "cleanup"])
    gitlab.add_argument("rest", nargs="*", metavar="SCRIPT STAGE", help="run's arguments")
    gitlab.add_argument("--images", type=Path, metavar="FILE",
                        help="prepare: a TOML file of images, by the name in a job's "
                        "image:")  # fmt: skip
    gitlab.add_argument("--default-image", metavar="NAME",
                        help="prepare: for a job that names no image (pool:NAME, or a name "
                        "in --images)")  # fmt: skip

    logs = _command(commands, "logs", "print a VM's serial console", client)
    _vm_argument(logs, "id")
    logs.add_argument("--follow", "-f", action="store_true",
                      help="go on printing what the guest writes until the VM is gone")  # fmt: skip

    listing = _command(commands, "list", "list the VMs", client)
    listing.add_argument("--quiet", "-q", action="store_true", help="print only their IDs")
    _label_filter(listing, "list only the VMs with this label; repeatable (ANDed)")
    listing.add_argument("--status", dest="statuses", action="append", default=[],
                         choices=[status.value for status in Status],
                         help="list only the VMs in this status; repeatable")  # fmt: skip

    delete = _command(commands, "delete", "destroy VMs: each one given, or every one with the "
                                          "labels given", client)  # fmt: skip
    _vm_argument(delete, "ids", nargs="*", metavar="ID")
    _label_filter(delete, "destroy every VM with this label (they are listed first); "
                          "repeatable (ANDed)")  # fmt: skip

    renew = _command(commands, "renew", "renew a VM's lease", client)
    _vm_argument(renew, "id")
    renew.add_argument("--ttl", type=int, required=True, metavar="SECONDS",
                       help="the lease ends this long from now")  # fmt: skip

    wait = _command(commands, "wait", "wait until a VM runs, showing its progress", client)
    _vm_argument(wait, "id")
    wait.add_argument("--timeout", type=seconds, default=DEFAULT_WAIT_TIMEOUT,
                      metavar="SECONDS", help="give up after this long")  # fmt: skip

    images = _command(commands, "images", "list, fetch or delete gold images", client)
    actions = images.add_subparsers(dest="image_command", metavar="ACTION")
    # the actions take the client options too; SUPPRESS keeps them from undoing those before
    _command(actions, "list", "list the gold images (the default)", client)
    pull = _command(actions, "pull", "fetch an image ahead of time", client)
    pull.add_argument("image_url", help="the package's URL, or oci://REGISTRY/REPOSITORY:TAG")
    pull.add_argument("--checksum", help="the package's checksum, in hex (for a URL)")
    pull.add_argument("--checksum-type", choices=CHECKSUM_TYPES,
                      help="the checksum's type (default: sha256)")  # fmt: skip
    _wait_options(pull, DEFAULT_CREATE_TIMEOUT, "wait until it is ready, showing progress")
    build = _command(actions, "build", "make a VM's disk a gold image (the VM stops)", client)
    build.add_argument("vm", help="the VM's ID, name, or the start of its ID")
    build.add_argument("--name", required=True, help="the image's name")
    build.add_argument("--push", metavar="oci://REF", help="push it there too (REF with a tag)")
    build.add_argument("--chunk-mb", type=int, help="the pushed artifact's chunk size (64)")
    push = _command(actions, "push", "push a gold image to a registry", client)
    push.add_argument("id", help="the image's ID, as `goldclone images` lists")
    push.add_argument("reference", metavar="oci://REF", help="REGISTRY/REPOSITORY:TAG")
    push.add_argument("--chunk-mb", type=int, help="the artifact's chunk size in MiB (64)")
    remove = _command(actions, "delete", "delete a gold image, or forget every failed one",
                      client)  # fmt: skip
    remove.add_argument("id", nargs="?",
                        help="<checksum_type>-<checksum>, as `goldclone images` lists")  # fmt: skip
    remove.add_argument("--failed", action="store_true",
                        help="forget every image whose fetch failed, instead")  # fmt: skip

    pools = _command(commands, "pools", "list, set or delete warm pools", client)
    actions = pools.add_subparsers(dest="pool_command", metavar="ACTION")
    _command(actions, "list", "list the warm pools (the default)", client)
    put = _command(actions, "set", "make a warm pool, or change one, from its whole "
                   "definition: what is not given takes its default", client)  # fmt: skip
    put.add_argument("name", help="the pool's name (a DNS label)")
    _image_and_shape(put)
    put.add_argument("--size", type=int, help="VMs kept ready on each host (default: 1)")
    put.add_argument("--from", dest="from_file", type=Path, metavar="FILE",
                     help="the pool as JSON (PUT /pools/NAME's body); the options above win "
                     "over its fields")  # fmt: skip
    _wait_options(put, DEFAULT_CREATE_TIMEOUT, "wait until it has its size ready")
    remove_pool = _command(actions, "delete", "delete a warm pool and the VMs it holds "
                           "unclaimed", client)  # fmt: skip
    remove_pool.add_argument("name")

    kept = _command(commands, "templates", "list, make or delete memory templates", client)
    actions = kept.add_subparsers(dest="template_command", metavar="ACTION")
    listed = _command(actions, "list", "list the templates (the default)", client)
    listed.add_argument("image_id", nargs="?", help="only this image's")
    make = _command(actions, "create", "make a memory template of a ready image", client)
    make.add_argument("image_id", help="the image, as `goldclone images` lists it")
    make.add_argument("--cpus", type=int, help="vCPUs of the VMs it is for (default: 2)")
    make.add_argument("--memory", type=int, help="megabytes of the VMs it is for "
                      "(default: 1024)")  # fmt: skip
    _disk_size(make, "the disk in GiB of the VMs it is for (default: the image's)")
    make.add_argument("--ready-when", metavar="JSON",
                      help='what "ready" means before it is saved, e.g. '
                      '\'{"tcp": 22}\'')  # fmt: skip
    _wait_options(make, DEFAULT_CREATE_TIMEOUT, "wait until it is ready")
    unmake = _command(actions, "delete", "delete a memory template", client)
    unmake.add_argument("image_id", help="its image")
    unmake.add_argument("template_id", help="the template, as `goldclone templates` lists it")

    fleet = _command(commands, "hosts", "list the hosts on the server's database, or forget one",
                     client)  # fmt: skip
    actions = fleet.add_subparsers(dest="host_command", metavar="ACTION")
    _command(actions, "list", "list the hosts (the default)", client)
    forget = _command(actions, "forget", "forget a lost host: its VMs end as host-lost", client)
    forget.add_argument("id", help="the host's ID, as `goldclone hosts` lists")
    return parser


def _command(
    commands: argparse._SubParsersAction[_Parser] | None,
    name: str,
    text: str,
    *parents: argparse.ArgumentParser,
) -> _Parser:
    """A (sub)command whose help shows its defaults and ends with the exit codes."""
    options = {"formatter_class": _HelpFormatter, "epilog": exits.HELP, "parents": parents}
    if commands is None:
        return _Parser(prog=name, description=text, **options)  # type: ignore[arg-type]
    return commands.add_parser(name, help=text, description=text, **options)  # type: ignore[arg-type]


def _client_options() -> argparse.ArgumentParser:
    """--url and --json, for every client command. Their defaults are filled in by ``main``:
    a default here would let a subcommand reset what its parent command parsed."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--url", default=argparse.SUPPRESS,
                         help="the server (default: GOLDCLONE_URL, else "
                         "http://127.0.0.1:12345)")  # fmt: skip
    _json_option(options)
    return options


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON only, for scripts; errors too, on stderr")  # fmt: skip


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="a TOML file of settings (default: GOLDCLONE_CONFIG); the "
                        "environment wins over it, and options over both")  # fmt: skip


def _image_and_shape(parser: argparse.ArgumentParser, defaults_of: str = "") -> None:
    """IMAGE_URL, its checksum and the VMs' shape, as ``create`` and ``pools set`` take them."""
    parser.add_argument("image_url", nargs="?",
                        help="the package's URL, oci://REGISTRY/REPOSITORY[:TAG], or a gold "
                        "image's ID (sha256-HEX)")  # fmt: skip
    parser.add_argument("--checksum", help="the package's checksum, in hex")
    parser.add_argument("--checksum-type", choices=CHECKSUM_TYPES,
                        help="the checksum's type (default: sha256)")  # fmt: skip
    parser.add_argument("--cpus", type=int, help=f"vCPUs (default: {defaults_of}2)")
    parser.add_argument("--memory", type=int, help=f"megabytes (default: {defaults_of}1024)")
    _disk_size(parser, f"the disk in GiB, grown from the image's (default: {defaults_of}its size)")
    parser.add_argument("--network", choices=["nat", "hostonly", "bridged"],
                        help="the network type (default: nat)")  # fmt: skip


def _disk_size(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--disk-size", type=int, metavar="GIB", help=help)


def _vm_argument(parser: argparse.ArgumentParser, dest: str, **options: Any) -> None:
    """A VM, named by its ID, its name or the start of its ID (the server resolves it); the
    shell completes the IDs and names that the server lists."""
    options.setdefault("help", "the VM's ID, its name, or the start of its ID")
    argument = parser.add_argument(dest, **options)
    argument.completer = _vms_for_completion  # type: ignore[attr-defined]


def _vms_for_completion(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
    from goldclone.client import APIError, Client, ServerUnreachable

    try:
        with Client(getattr(parsed_args, "url", None), timeout=COMPLETION_TIMEOUT) as client:
            vms = client.list_vms()
    except (APIError, ServerUnreachable):
        return []
    words = [vm.id for vm in vms] + [vm.name for vm in vms if vm.name]
    return [word for word in words if word.startswith(prefix)]


def _wait_options(parser: argparse.ArgumentParser, timeout: float, text: str) -> None:
    parser.add_argument("--wait", action="store_true", help=text)
    parser.add_argument("--timeout", type=seconds, default=timeout, metavar="SECONDS",
                        help="with --wait: give up waiting after this long")  # fmt: skip


def _label_filter(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument("--label", dest="labels", action="append", default=[],
                        metavar="KEY=VALUE", help=text)  # fmt: skip
