"""GitLab Runner's custom executor on goldclone (``goldclone gitlab-executor STAGE``): a VM per
job, made in ``prepare``, each of the job's scripts run in it through exec in ``run``, and the
VM deleted in ``cleanup`` whatever happened (docs/ci.md shows the runner's ``config.toml``).

The runner calls each stage as a process of its own, with the job's variables as
``CUSTOM_ENV_*``; the VM is found again by its name, made of the job's ID. A script that fails
exits with the runner's ``BUILD_FAILURE_EXIT_CODE``, anything of goldclone's own that fails
with its ``SYSTEM_FAILURE_EXIT_CODE``.
"""

from __future__ import annotations

import asyncio
import re
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

from goldclone import __version__
from goldclone.client import Client, ClientError
from goldclone.client.exec import ExecSession
from goldclone.exec_protocol import ExecRequest, ExecResult
from goldclone.integrations.requests import delete_vm, vm_request
from goldclone.models import CreateVMRequest

BUILDS_DIR = "/builds"
CACHE_DIR = "/cache"
READY_TIMEOUT = 900.0
POOL_PREFIX = "pool:"
_STAGE = re.compile(r"[a-z][a-z0-9_]{0,63}")
# Run by the guest's sh: keep the script that comes on stdin, then run it with bash where the
# guest has it (GitLab writes bash), else sh.
_RUN_SCRIPT = (
    'set -e; d=/tmp/goldclone-gitlab; mkdir -p "$d"; f="$d/$0"; cat > "$f"; '
    'if command -v bash >/dev/null 2>&1; then exec bash "$f"; else exec sh "$f"; fi'
)


class SystemFailure(Exception):
    """goldclone could not do its part; the message says why, in the job's log."""


def config() -> dict[str, Any]:
    """What ``config_exec`` prints for the runner."""
    return {
        "builds_dir": BUILDS_DIR,
        "cache_dir": CACHE_DIR,
        "builds_dir_is_shared": False,
        "driver": {"name": "goldclone", "version": __version__},
        "shell": "bash",
    }


def vm_name(env: Mapping[str, str]) -> str:
    """The job's VM, by name: one per job ID."""
    job = env.get("CUSTOM_ENV_CI_JOB_ID", "")
    if not job.isdigit():
        raise SystemFailure("CUSTOM_ENV_CI_JOB_ID is not a job ID: is this run by GitLab Runner?")
    return f"gitlab-job-{job}"


def request_for(
    client: Client, env: Mapping[str, str], images: Path | None, default: str | None
) -> CreateVMRequest:
    """The VM for the job's ``image:`` (``CUSTOM_ENV_CI_JOB_IMAGE``, else ``default``):
    ``pool:NAME`` is a warm pool's image and shape (so the VM is claimed from it), any other
    name an entry of the ``images`` file (docs/ci.md)."""
    wanted = env.get("CUSTOM_ENV_CI_JOB_IMAGE") or default
    if not wanted:
        raise SystemFailure("the job names no image, and the executor has no --default-image")
    labels = {"gitlab.com/job-id": env.get("CUSTOM_ENV_CI_JOB_ID", "")}
    base = {"name": vm_name(env), "on_poweroff": "delete", "labels": labels}
    pool = wanted.removeprefix(POOL_PREFIX) if wanted.startswith(POOL_PREFIX) else None
    entry = None if pool is not None else _images(images).get(wanted)
    if pool is None and entry is None:
        raise SystemFailure(f"image {wanted!r} is neither pool:NAME nor in the images file")
    try:
        return vm_request(client, pool, entry, base)
    except ValueError as exc:
        raise SystemFailure(f"image {wanted!r}: {exc}") from None


def _images(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        return dict(tomllib.loads(path.read_text()).get("images", {}))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SystemFailure(f"the images file {path}: {exc}") from None


def prepare(client: Client, request: CreateVMRequest, say: BinaryIO) -> None:
    """Make the job's VM and wait until it runs; one that fails is deleted at once."""
    vm = client.create(request)
    say.write(f"goldclone: VM {vm.id} ({request.name}) for this job\n".encode())
    say.flush()
    try:
        vm = client.wait_until_running(vm.id, timeout=READY_TIMEOUT)
    except ClientError:
        delete_vm(client, vm.id)
        raise
    how = vm.started_from or "a cold boot"
    say.write(f"goldclone: running on host {vm.host}, from {how}, at {vm.ip_address}\n".encode())
    say.flush()


def run(client: Client, name: str, script: Path, stage: str) -> int:
    """Run the runner's ``script`` for ``stage`` in the job's VM, its output streamed as it
    comes; the script's exit code."""
    if not _STAGE.fullmatch(stage):
        raise SystemFailure(f"{stage!r} is not a stage name")
    try:
        body = script.read_bytes()
    except OSError as exc:
        raise SystemFailure(f"cannot read the runner's script {script}: {exc.strerror}") from None
    request = ExecRequest(argv=["/bin/sh", "-c", _RUN_SCRIPT, stage])
    url, headers = client.websocket_target()
    result = asyncio.run(_stream(url, headers, name, request, body))
    if result.error is not None and result.error["code"] != "cannot-run":
        raise SystemFailure(f"{result.error['code']}: {result.error['message']}")
    return result.exit_code if result.exit_code is not None else 1


async def _stream(
    url: str, headers: dict[str, str], vm: str, request: ExecRequest, stdin: bytes
) -> ExecResult:
    session = await ExecSession.open(url, headers, vm, request)
    try:
        await session.write(stdin)
        await session.write(b"")
        async for stream, data in session.output():
            out = sys.stdout.buffer if stream == 1 else sys.stderr.buffer
            out.write(data)
            out.flush()
    finally:
        await session.close()
    assert session.result is not None
    return session.result


def cleanup(client: Client, name: str) -> None:
    """Delete the job's VM, if there is one."""
    delete_vm(client, name)
