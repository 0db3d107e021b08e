"""The ``goldclone`` command."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from pathlib import Path

from goldclone.config import Settings

DEMO_PACKAGE = "goldclone-demo.tar.gz"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="goldclone", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the HTTP API")
    serve.add_argument("--host", help="address to listen on (GOLDCLONE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (PORT, default 12345)")
    serve.add_argument("--data-dir", type=Path, help="state and images (GOLDCLONE_DATA_DIR)")
    serve.add_argument(
        "--demo",
        action="store_true",
        help=f"build the demo guest and serve it at /demo/{DEMO_PACKAGE}",
    )

    demo = commands.add_parser("demo-image", help="build the tiny demo guest as an image package")
    demo.add_argument("out", type=Path, help="where to write the .tar.gz")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"goldclone: {exc}", file=sys.stderr)
        return 2
    if args.command == "demo-image":
        return _demo_image(args.out)
    overrides = {
        name: value
        for name, value in (("host", args.host), ("port", args.port), ("data_dir", args.data_dir))
        if value is not None
    }
    settings = dataclasses.replace(settings, **overrides)
    from goldclone.server import serve

    demo_dir = _prepare_demo(settings) if args.demo else None
    serve(settings, demo_dir)
    return 0


def _demo_image(out: Path) -> int:
    from goldclone.demo_image import build_demo_image

    print(asyncio.run(build_demo_image(out)))
    return 0


def _prepare_demo(settings: Settings) -> Path:
    """Build the demo package once and print the request that boots it."""
    from goldclone.demo_image import build_demo_image

    demo_dir = settings.data_dir.absolute() / "demo"
    package = demo_dir / DEMO_PACKAGE
    checksum_file = demo_dir / "sha256"
    if not (package.exists() and checksum_file.exists()):
        demo_dir.mkdir(parents=True, exist_ok=True)
        checksum_file.write_text(asyncio.run(build_demo_image(package)))
    base = f"http://{settings.host}:{settings.port}"
    body = {
        "image": {
            "url": f"{base}/demo/{DEMO_PACKAGE}",
            "checksum": checksum_file.read_text().strip(),
            "checksum_type": "sha256",
        },
        "cpus": 1,
        "memory": 256,
        "network_type": "nat",
    }
    print(
        "\nCreate a VM from the demo image with:\n\n"
        f"  curl -s -X POST {base}/vms -H 'Content-Type: application/json' \\\n"
        f"       -d '{json.dumps(body)}'\n\n"
        f"then watch it with:  curl -s {base}/vms\n",
        file=sys.stderr,
    )
    return demo_dir


if __name__ == "__main__":
    sys.exit(main())
