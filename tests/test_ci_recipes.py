"""The CI recipes of docs/ci.md, played on the demo guest: GitHub Actions' ephemeral runner,
with a stand-in runner script and a stand-in GitHub (neither can run here)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import pytest

from goldclone.settings import Settings
from tests.conftest import checksum
from tests.harness import goldclone_server, leftovers
from tests.servers import CallbackReceiver, FileServer

pytestmark = pytest.mark.root

HOST, GITHUB_PORT = "192.168.123.1", 3142  # the default nat bridge's address; an allowed port
JIT_CONFIG = "eyJqaXQiOiAic3RhbmQtaW4tcnVubmVyLWNvbmZpZyJ9"
RUNNER = """#!/bin/sh
# A stand-in for `./run.sh --jitconfig "$JIT"`: it takes its one job with the JIT config from
# the VM's metadata, runs it, reports to "GitHub", exits; then the VM powers off.
(
while ! ip -4 addr show dev eth0 | grep -q inet; do sleep 0.1; done
meta=/run/goldclone/metadata.json
[ -r "$meta" ] || meta=/sys/firmware/qemu_fw_cfg/by_name/opt/goldclone/metadata/raw
jit=$(sed -n 's/.*"jitconfig": *"\\([^"]*\\)".*/\\1/p' "$meta")
output=$(echo "job ran on $(hostname)")
body="{{\\"jitconfig\\": \\"$jit\\", \\"output\\": \\"$output\\"}}"
head='POST /job HTTP/1.0\\r\\nContent-Type: application/json\\r\\nContent-Length: %d\\r\\n\\r\\n'
printf "$head%s" "${{#body}}" "$body" | nc {host} {port} >/dev/null
sync
poweroff -f
) >/dev/null 2>&1 &
"""


@pytest.fixture
def github_reachable(settings: Settings) -> Settings:
    """The host lets guests reach the stand-in GitHub's port, as it would let them reach the
    internet for the real one."""
    network = dataclasses.replace(settings.network, guest_host_ports=(GITHUB_PORT,))
    return dataclasses.replace(settings, network=network)


async def test_an_ephemeral_github_runner_runs_one_job_and_its_vm_goes(
    github_reachable: Settings,
    file_server: FileServer,
    demo_package: Path,
    callbacks: CallbackReceiver,
) -> None:
    image = {"url": file_server.url(demo_package.name), "checksum": checksum(demo_package)}
    body = {"image": image, "cpus": 1, "memory": 256, "name": "runner-4711",
            "user_data": RUNNER.format(host=HOST, port=GITHUB_PORT),
            "metadata": {"jitconfig": JIT_CONFIG}, "on_poweroff": "delete", "ttl": 3600,
            "labels": {"github-job": "4711"}, "callback_url": callbacks.url}  # fmt: skip
    with CallbackReceiver(port=GITHUB_PORT, address="0.0.0.0").running() as github:
        async with goldclone_server(github_reachable) as goldclone:
            vm = await goldclone.post_vm(body)
            [job] = await asyncio.to_thread(github.wait_for, 1, 120)
            assert job == {"jitconfig": JIT_CONFIG, "output": "job ran on runner-4711"}
            async with asyncio.timeout(60):  # its power-off, then the next look and the delete
                while (await goldclone.client.get(f"/vms/{vm['id']}")).status_code != 404:
                    await asyncio.sleep(0.2)
            assert leftovers(goldclone.data_dir, vm) == []
            told = await asyncio.to_thread(callbacks.wait_for, 2, 30)
            assert [b["status"] for b in told] == ["running", "deleting"], told
            assert JIT_CONFIG not in json.dumps(told)  # metadata values are never shown
