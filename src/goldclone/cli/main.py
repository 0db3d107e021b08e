"""goldclone: the server (serve), the demo image, and a client for the API.

Client commands talk to the server at --url (or GOLDCLONE_URL), with the bearer token in
GOLDCLONE_TOKEN if the server needs one. Their exit codes: 0 success,
1 the VM ended in error (or the server refused the operation), 2 a usage error, 3 the server
cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from pydantic import BaseModel, ValidationError
from rich.console import Console

from goldclone.client import APIError, Client, ServerUnreachable, VMFailed, WaitTimeout, default_url
from goldclone.models import VM, CreateVMRequest, ImageSpec, Status, UpdateVMRequest

if TYPE_CHECKING:
    from goldclone.settings import Settings

DEMO_PACKAGE = "goldclone-demo.tar.gz"
_Request = TypeVar("_Request", bound=BaseModel)
OK, FAILED, USAGE, UNREACHABLE = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="goldclone", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve the HTTP API")
    serve.add_argument("--host", help="address to listen on (GOLDCLONE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (PORT, default 12345)")
    serve.add_argument("--data-dir", type=Path, help="state and images (GOLDCLONE_DATA_DIR)")
    serve.add_argument(
        "--demo", action="store_true",
        help=f"build the demo guest and serve it at /demo/{DEMO_PACKAGE}",
    )  # fmt: skip

    demo = commands.add_parser("demo-image", help="build the tiny demo guest as an image package")
    demo.add_argument("out", type=Path, help="where to write the .tar.gz")

    client = _client_options()

    create = commands.add_parser("create", parents=[client], help="create a VM")
    create.add_argument("image_url", nargs="?", help="the image package's URL")
    create.add_argument("--checksum", help="the package's checksum, in hex")
    create.add_argument("--checksum-type", default="sha256",
                        choices=["md5", "sha1", "sha256", "sha512"])  # fmt: skip
    create.add_argument("--cpus", type=int)
    create.add_argument("--memory", type=int, help="megabytes")
    create.add_argument("--network", choices=["nat", "hostonly", "bridged"])
    create.add_argument("--callback-url")
    create.add_argument("--gui", action="store_true", help="give the VM a display")
    create.add_argument("--name", help="the VM's name and the guest's hostname (a DNS label)")
    create.add_argument(
        "--ssh-key",
        dest="ssh_keys",
        type=Path,
        action="append",
        metavar="FILE",
        help="an OpenSSH public key file (.pub); repeatable",
    )
    create.add_argument(
        "--user-data",
        type=Path,
        metavar="FILE",
        help="cloud-init user data: a #cloud-config file or a #! script",
    )
    create.add_argument(
        "--metadata",
        action="append",
        metavar="KEY=VALUE",
        help="metadata the guest can read; repeatable",
    )
    create.add_argument(
        "--ready-when", metavar="JSON", help='what "ready" means, e.g. \'{"tcp": 22}\''
    )
    create.add_argument("--ttl", type=int, metavar="SECONDS",
                        help="its lease: destroyed this long from now unless renewed "
                             "(default: the server's)")  # fmt: skip
    create.add_argument("--label", dest="labels", action="append", metavar="KEY=VALUE",
                        help="a label; repeatable")  # fmt: skip
    create.add_argument("--from", dest="from_file", type=Path,
                        help="a JSON request body, as the original project's files")  # fmt: skip
    create.add_argument("--wait", action="store_true", help="wait until it runs, showing progress")

    get = commands.add_parser("get", parents=[client], help="show a VM")
    get.add_argument("id")
    listing = commands.add_parser("list", parents=[client], help="list the VMs")
    _filter_options(listing, "list only the VMs with this label; repeatable (ANDed)")
    listing.add_argument("--status", dest="statuses", action="append", default=[],
                         choices=[status.value for status in Status],
                         help="list only the VMs in this status; repeatable")  # fmt: skip
    delete = commands.add_parser("delete", parents=[client], help="destroy VMs")
    delete.add_argument("ids", nargs="*", metavar="ID")
    _filter_options(delete, "destroy every VM with this label (they are listed first); "
                            "repeatable (ANDed)")  # fmt: skip
    renew = commands.add_parser("renew", parents=[client], help="renew a VM's lease")
    renew.add_argument("id")
    renew.add_argument("--ttl", type=int, required=True, metavar="SECONDS",
                       help="the lease ends this long from now")  # fmt: skip
    wait = commands.add_parser("wait", parents=[client], help="wait until a VM runs")
    wait.add_argument("id")
    wait.add_argument("--timeout", type=float, default=600.0)

    images = commands.add_parser("images", parents=[client], help="list, fetch or delete images")
    image_commands = images.add_subparsers(dest="image_command", metavar="ACTION")
    # the actions take the options too; SUPPRESS keeps them from undoing what came before
    image_commands.add_parser("list", parents=[client], help="list the gold images (default)")
    pull = image_commands.add_parser("pull", parents=[client], help="fetch an image ahead of time")
    pull.add_argument("image_url")
    pull.add_argument("--checksum", required=True)
    pull.add_argument("--checksum-type", default="sha256",
                      choices=["md5", "sha1", "sha256", "sha512"])  # fmt: skip
    remove = image_commands.add_parser("delete", parents=[client], help="delete a gold image")
    remove.add_argument("id", help="<checksum_type>-<checksum>, as `goldclone images` lists")
    return parser


def _filter_options(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument("--label", dest="labels", action="append", default=[],
                        metavar="KEY=VALUE", help=text)  # fmt: skip


def _client_options() -> argparse.ArgumentParser:
    """--url and --json, for every client command. Their defaults are filled in by ``main``:
    a default here would let a subcommand reset what its parent command parsed."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--url", default=argparse.SUPPRESS, help="the server (GOLDCLONE_URL)")
    options.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                         help="print raw JSON only, for scripts")  # fmt: skip
    return options


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.url = getattr(args, "url", None) or default_url()
    args.json = getattr(args, "json", False)
    if args.command == "serve":
        return _serve(args)
    if args.command == "demo-image":
        from goldclone.demo.image import build_demo_image

        print(asyncio.run(build_demo_image(args.out)))
        return OK
    return _run_client_command(args)


# -- the server --------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    from goldclone.settings import Settings

    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"goldclone: {exc}", file=sys.stderr)
        return USAGE
    overrides = {
        name: value
        for name, value in (("host", args.host), ("port", args.port), ("data_dir", args.data_dir))
        if value is not None
    }
    settings = dataclasses.replace(settings, **overrides)
    from goldclone.errors import GoldcloneError
    from goldclone.server import serve

    try:
        serve(settings, _prepare_demo(settings) if args.demo else None)
    except GoldcloneError as exc:
        print(f"goldclone serve: {exc.message}", file=sys.stderr)
        return FAILED
    return OK


def _prepare_demo(settings: Settings) -> Path:
    """Build the demo package once and print the commands that boot it."""
    from goldclone.demo.image import build_demo_image

    demo_dir = settings.data_dir.absolute() / "demo"
    package = demo_dir / DEMO_PACKAGE
    checksum_file = demo_dir / "sha256"
    if not (package.exists() and checksum_file.exists()):
        demo_dir.mkdir(parents=True, exist_ok=True)
        checksum_file.write_text(asyncio.run(build_demo_image(package)))
    base = f"http://{settings.host}:{settings.port}"
    url, checksum = f"{base}/demo/{DEMO_PACKAGE}", checksum_file.read_text().strip()
    body = {
        "image": {"url": url, "checksum": checksum, "checksum_type": "sha256"},
        "cpus": 1,
        "memory": 256,
        "network_type": "nat",
    }
    print(
        "\nCreate a VM from the demo image, and wait for it, with:\n\n"
        f"  .venv/bin/goldclone create {url} --checksum {checksum} --cpus 1 --memory 256 --wait\n"
        "\nor with curl:\n\n"
        f"  curl -s -X POST {base}/vms -H 'Content-Type: application/json' \\\n"
        f"       -d '{json.dumps(body)}'\n",
        file=sys.stderr,
    )
    return demo_dir


# -- the client ---------------------------------------------------------------------------------


def _run_client_command(args: argparse.Namespace) -> int:
    # Piped output is not cut to 80 columns, so IDs and addresses stay whole.
    out = Console(width=None if sys.stdout.isatty() else 240)
    err = Console(stderr=True)
    try:
        with Client(args.url) as client:
            return _CLIENT_COMMANDS[args.command](client, args, out)
    except _UsageError as exc:
        err.print(f"goldclone {args.command}: {exc}", markup=False, highlight=False)
        return USAGE
    except VMFailed as exc:
        if args.json:
            _print_json(exc.vm)
        err.print(f"{exc.code}: {exc.message}", markup=False, highlight=False)
        return FAILED
    except WaitTimeout as exc:
        err.print(str(exc), markup=False, highlight=False)
        return FAILED
    except APIError as exc:
        err.print(f"{exc.code}: {exc.message}", markup=False, highlight=False)
        return USAGE if exc.status == 400 else FAILED
    except ServerUnreachable as exc:
        err.print(str(exc), markup=False, highlight=False)
        return UNREACHABLE


class _UsageError(Exception):
    pass


def _print_json(value: BaseModel | list[BaseModel] | dict[str, object]) -> None:
    if isinstance(value, BaseModel):
        print(value.model_dump_json(indent=2))
    elif isinstance(value, list):
        print(json.dumps([item.model_dump(mode="json") for item in value], indent=2))
    else:
        print(json.dumps(value, indent=2))


def _create_request(args: argparse.Namespace) -> CreateVMRequest:
    """The request from ``--from FILE`` or from the options; options win over the file."""
    body: dict[str, object] = {}
    if args.from_file is not None:
        try:
            body = json.loads(args.from_file.read_text())
        except (OSError, ValueError) as exc:
            raise _UsageError(f"cannot read {args.from_file}: {exc}") from None
    elif not (args.image_url and args.checksum):
        raise _UsageError("give IMAGE_URL and --checksum, or --from FILE")
    if args.image_url:
        body["image"] = {"url": args.image_url, "checksum": args.checksum or "",
                         "checksum_type": args.checksum_type}  # fmt: skip
    options = {
        "cpus": args.cpus,
        "memory": args.memory,
        "network_type": args.network,
        "callback_url": args.callback_url,
        "headless": False if args.gui else None,
    }
    body |= {name: value for name, value in options.items() if value is not None}
    body |= _guest_options(args)
    return _validated(CreateVMRequest, body)


def _validated(model: type[_Request], body: dict[str, object]) -> _Request:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _UsageError(_first_problem(exc)) from None


def _guest_options(args: argparse.Namespace) -> dict[str, object]:
    """``--name``, ``--ssh-key``, ``--user-data``, ``--metadata`` and ``--ready-when``, as
    request fields; files are read here, so a missing one is a usage error."""
    fields: dict[str, object] = {}
    if args.name is not None:
        fields["name"] = args.name
    if args.ssh_keys:
        keys = [line.strip() for path in args.ssh_keys for line in _read(path).splitlines()]
        fields["ssh_authorized_keys"] = [key for key in keys if key and not key.startswith("#")]
    if args.user_data is not None:
        fields["user_data"] = _read(args.user_data)
    if args.metadata:
        fields["metadata"] = _pairs("--metadata", args.metadata)
    if args.ttl is not None:
        fields["ttl"] = args.ttl
    if args.labels:
        fields["labels"] = _pairs("--label", args.labels)
    if args.ready_when is not None:
        try:
            fields["ready_when"] = json.loads(args.ready_when)
        except ValueError:
            raise _UsageError("--ready-when: expected JSON, e.g. '{\"tcp\": 22}'") from None
    return fields


def _pairs(option: str, items: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` items as a map; a usage error names the option of one without ``=``."""
    pairs = [item.partition("=") for item in items]
    if bad := [key for key, equals, _ in pairs if not equals]:
        raise _UsageError(f"{option} {bad[0]}: expected KEY=VALUE")
    return {key: value for key, _, value in pairs}


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise _UsageError(f"cannot read {path}: {exc}") from None


def _first_problem(exc: ValidationError) -> str:
    error = exc.errors()[0]
    field = ".".join(str(part) for part in error["loc"]) or "request"
    return f"{field}: {error['msg']}"


def _wait(client: Client, vm: VM, args: argparse.Namespace, out: Console, timeout: float) -> VM:
    """Wait for ``vm`` to run; on a terminal, show its phases and download as they happen."""
    if args.json:
        return client.wait_until_running(vm.id, timeout)
    from goldclone.cli.display import WaitDisplay

    with WaitDisplay(out) as display:
        vm = client.wait_until_running(vm.id, timeout, on_update=display.update)
    out.print(vm.ip_address, highlight=False)
    return vm


def _create(client: Client, args: argparse.Namespace, out: Console) -> int:
    vm = client.create(_create_request(args))
    if args.wait:
        vm = _wait(client, vm, args, out, timeout=3600.0)
    if args.json:
        _print_json(vm)
    elif not args.wait:
        out.print(vm.id, highlight=False)
    return OK


def _get(client: Client, args: argparse.Namespace, out: Console) -> int:
    vm = client.get(args.id)
    if args.json:
        _print_json(vm)
    else:
        from goldclone.cli.display import vm_table

        out.print(vm_table([vm]))
        if vm.error:
            out.print(f"error: {vm.error.code}: {vm.error.message}", markup=False)
    return OK


def _list(client: Client, args: argparse.Namespace, out: Console) -> int:
    statuses = [Status(status) for status in args.statuses]
    vms = client.list_vms(_pairs("--label", args.labels), statuses)
    if args.json:
        _print_json({"vms": [vm.model_dump(mode="json") for vm in vms]})
    else:
        from goldclone.cli.display import vm_table

        out.print(vm_table(vms))
    return OK


def _delete(client: Client, args: argparse.Namespace, out: Console) -> int:
    if bool(args.ids) == bool(args.labels):
        raise _UsageError("give the IDs of the VMs, or --label KEY=VALUE, not both")
    ids = args.ids
    if args.labels:
        matching = client.list_vms(_pairs("--label", args.labels))
        ids = [vm.id for vm in matching]
        if not args.json:
            from goldclone.cli.display import vm_table

            out.print(f"deleting {len(ids)} VM{'s' if len(ids) != 1 else ''}:", highlight=False)
            out.print(vm_table(matching))
    for vm_id in ids:
        client.delete(vm_id)
        if not args.json:
            out.print(f"deleted {vm_id}", highlight=False)
    return OK


def _renew(client: Client, args: argparse.Namespace, out: Console) -> int:
    vm = client.update(args.id, _validated(UpdateVMRequest, {"ttl": args.ttl}))
    if args.json:
        _print_json(vm)
    else:
        out.print(f"{vm.id} expires at {vm.expires_at or 'never'}", highlight=False)
    return OK


def _wait_command(client: Client, args: argparse.Namespace, out: Console) -> int:
    vm = _wait(client, client.get(args.id), args, out, timeout=args.timeout)
    if args.json:
        _print_json(vm)
    return OK


def _images(client: Client, args: argparse.Namespace, out: Console) -> int:
    action = args.image_command or "list"
    if action == "pull":
        spec = _validated(ImageSpec, {"url": args.image_url, "checksum": args.checksum,
                                      "checksum_type": args.checksum_type})  # fmt: skip
        image = client.pull_image(spec)
        if args.json:
            _print_json(image)
        else:
            out.print(f"{image.id} {image.status.value}", highlight=False)
    elif action == "delete":
        client.delete_image(args.id)
        if not args.json:
            out.print(f"deleted {args.id}", highlight=False)
    else:
        images = client.images()
        if args.json:
            _print_json({"images": [image.model_dump(mode="json") for image in images]})
        else:
            from goldclone.cli.display import image_table

            out.print(image_table(images))
    return OK


_CLIENT_COMMANDS: dict[str, Callable[[Client, argparse.Namespace, Console], int]] = {
    "create": _create,
    "get": _get,
    "list": _list,
    "delete": _delete,
    "renew": _renew,
    "wait": _wait_command,
    "images": _images,
}
