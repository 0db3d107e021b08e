"""The commands of the host itself: serve, doctor, demo-image, completion."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from goldclone.cli.commands import Context, UsageError
from goldclone.cli.exits import Exit

if TYPE_CHECKING:
    from goldclone.settings import Settings

DEMO_PACKAGE = "goldclone-demo.tar.gz"


def settings_of(args: argparse.Namespace) -> Settings:
    """The settings: the defaults, then the config file, the environment, and the options
    (each wins over those before); a bad one is a usage error naming it."""
    from goldclone import settings_sources
    from goldclone.settings_sources import SettingsError

    try:
        settings = settings_sources.load(getattr(args, "config", None))
    except SettingsError as exc:
        raise UsageError(str(exc)) from None
    overrides = {
        name: value
        for name in ("host", "port", "data_dir")
        if (value := getattr(args, name, None)) is not None
    }
    return dataclasses.replace(settings, **overrides)


def serve(ctx: Context) -> Exit:
    """Exits 2 for bad settings, 1 for a service that cannot start (its port or data dir in
    use, no hypervisor, ...); a signal ends it as that signal's default would."""
    from goldclone.errors import GoldcloneError
    from goldclone.server import listen
    from goldclone.server import serve as run_server

    settings = settings_of(ctx.args)
    try:
        with listen(settings) as listening:
            run_server(settings, listening, _prepare_demo(settings) if ctx.args.demo else None)
    except GoldcloneError as exc:  # serve has no --json: its code would only be noise
        ctx.output.error("failed", exc.message)
        return Exit.FAILED
    return Exit.OK


def doctor(ctx: Context) -> Exit:
    from goldclone.doctor import check_host, render_findings

    findings = asyncio.run(check_host(settings_of(ctx.args)))
    lines, status = render_findings(findings)
    ctx.output.show("\n".join(lines))
    ctx.output.value({"findings": [finding.as_json() for finding in findings]})
    return Exit(status)


def settings_help() -> str:
    """Every setting, for ``serve --help``: its variable, its config file key, its default."""
    from goldclone.settings_sources import describe_settings

    lines = ["settings (environment variable, config file key, default):"]
    for setting in describe_settings():
        lines.append(f"  {setting.variable}, {setting.key} (default: {setting.default})")
        lines.append(f"      {setting.help}")
    return "\n".join(lines)


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
    if not settings.allow_private_urls:
        print(f"\nThe demo image is at {url}, but GOLDCLONE_ALLOW_PRIVATE_URLS is off, so this "
              "server will not fetch it from its own address: turn it on to try the demo, or "
              "serve the package from a public URL.\n", file=sys.stderr)  # fmt: skip
        return demo_dir
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
        f"       -d {shlex.quote(json.dumps(body))}\n",
        file=sys.stderr,
    )
    return demo_dir


def demo_image(ctx: Context) -> Exit:
    from goldclone.demo.image import build_demo_image

    out: Path = ctx.args.out
    try:
        checksum = asyncio.run(build_demo_image(out))
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc.strerror or exc}") from None
    ctx.output.show(checksum)
    ctx.output.value({"path": str(out.absolute()), "checksum": checksum,
                      "checksum_type": "sha256"})  # fmt: skip
    return Exit.OK


def completion(ctx: Context) -> Exit:
    from argcomplete.shell_integration import shellcode

    print(shellcode(["goldclone"], shell=ctx.args.shell), end="")
    return Exit.OK
