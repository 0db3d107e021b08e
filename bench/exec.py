"""(q) Jobs through exec on the real Debian 12 guest (issue #29): from a build request to the
first line of the job's output, from a warm pool and from a cold boot, side by side; what one
exec costs (``true``, median) against one ``ssh VM true``; and 50 MB of output through exec
against the same through ``ssh``.

The guest of the test suite (``--image`` or ``GOLDCLONE_DEBIAN_IMAGE``) at 1 vCPU and 1024 MB,
fetched and its pool's template made before any clock starts. A "build request" is
``POST /vms`` and then, once the VM runs, an exec of ``echo first line``; its time runs to the
first byte of that output at the client (a cold guest's helper may not answer yet when it has
its IP: the exec is then asked again, and that counts).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from bench._common import Server, describe, ms, scratch, serve, start, verdict, wait_running
from bench.real_guest import BOOT_TIMEOUT, debian_image, prefetch
from bench.template import fill_pool
from goldclone.client import APIError, AsyncClient
from goldclone.exec_protocol import ExecRequest
from tests.conftest import checksum, ssh_key
from tests.servers import FileServer

TARGET_POOL_S = 5.0
BLOB = 50 * 1000 * 1000
SSH = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
       "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]  # fmt: skip


async def first_line(server: Server, client: AsyncClient, body: dict[str, Any]) -> float:
    """POST → the first byte of the job's output; the VM is deleted after."""
    started = time.perf_counter()
    vm = await wait_running(server, (await server.post_vm(body))["id"], BOOT_TIMEOUT)
    try:
        while True:
            try:
                session = await client.exec_session(vm["id"], ExecRequest(script="echo first line"))
                break
            except APIError as exc:
                if exc.code != "exec-unavailable":
                    raise
        async for _ in session.output():
            elapsed = time.perf_counter() - started
            break
        await session.close()
        return elapsed
    finally:
        await server.delete(vm["id"])


async def overhead(client: AsyncClient, vm: dict[str, Any], key: Path, n: int) -> None:
    through_exec, through_ssh = [], []
    for _ in range(n):
        began = time.perf_counter()
        await client.exec(vm["id"], ExecRequest(argv=["true"]))
        through_exec.append(time.perf_counter() - began)
        began = time.perf_counter()
        await asyncio.to_thread(subprocess.run, [*SSH, "-i", str(key),
                                f"debian@{vm['ip_address']}", "true"], check=True)  # fmt: skip
        through_ssh.append(time.perf_counter() - began)
    print(describe("exec true", through_exec))
    print(describe("ssh true (a new connection each)", through_ssh))
    ratio = statistics.median(through_exec) / statistics.median(through_ssh)
    print(f"exec / ssh: {ratio:.3f} (medians)")


async def throughput(client: AsyncClient, vm: dict[str, Any], key: Path, runs: int) -> None:
    made = f"head -c {BLOB} /dev/urandom > /tmp/blob; chmod 644 /tmp/blob; sha256sum /tmp/blob"
    digest = (await client.exec(vm["id"], ExecRequest(script=made))).stdout.split()[0].decode()
    rates: dict[str, list[float]] = {"exec": [], "ssh": []}
    for _ in range(runs):
        began = time.perf_counter()
        out = (await client.exec(vm["id"], ExecRequest(argv=["cat", "/tmp/blob"]))).stdout
        rates["exec"].append(BLOB / (time.perf_counter() - began) / 1e6)
        assert hashlib.sha256(out).hexdigest() == digest
        began = time.perf_counter()
        ssh = [*SSH, "-i", str(key), f"debian@{vm['ip_address']}", "cat /tmp/blob"]
        out = (await asyncio.to_thread(subprocess.run, ssh, capture_output=True)).stdout
        rates["ssh"].append(BLOB / (time.perf_counter() - began) / 1e6)
        assert hashlib.sha256(out).hexdigest() == digest
    for how, values in rates.items():
        print(f"50 MB through {how}: median {statistics.median(values):.1f} MB/s "
              f"({', '.join(f'{v:.1f}' for v in values)})")  # fmt: skip
    print(f"exec / ssh: {statistics.median(rates['exec']) / statistics.median(rates['ssh']):.2f}")


async def main(image_path: Path, runs: int, calls: int) -> None:
    results: dict[str, list[float]] = {"pool": [], "cold": []}
    with scratch() as work:
        served = work / "served"
        served.mkdir()
        (served / "debian-12.qcow2").symlink_to(image_path)
        key, pub = await asyncio.to_thread(ssh_key, work)
        with FileServer(served).running() as files:
            image = {"url": files.url("debian-12.qcow2"), "checksum": checksum(image_path)}
            body = {"image": image, "cpus": 1, "memory": 1024, "network_type": "nat"}
            async with serve(work / "data", GOLDCLONE_IP_TIMEOUT=str(BOOT_TIMEOUT)) as server:
                client = AsyncClient(str(server.client.base_url))
                await prefetch(server, image)
                for run in range(runs):
                    for kind in ("pool", "cold") if run % 2 == 0 else ("cold", "pool"):
                        if kind == "pool":
                            await fill_pool(server, body)
                        request = {**body, "start": "auto" if kind == "pool" else "cold"}
                        elapsed = await first_line(server, client, request)
                        results[kind].append(elapsed)
                        print(f"run {run}: {kind:<4} build request -> first line {ms(elapsed)}")
                await server.client.delete("/pools/bench")
                ready = {"tcp": 22, "timeout": int(BOOT_TIMEOUT)}
                posted = await server.post_vm({**body, "ssh_authorized_keys": [pub],
                                               "ready_when": ready})  # fmt: skip
                vm = await wait_running(server, posted["id"], BOOT_TIMEOUT)
                print()
                await overhead(client, vm, key, calls)
                await throughput(client, vm, key, 3)
                await client.aclose()
    print()
    for kind, values in results.items():
        print(describe(f"{kind} build request -> first line", values))
    pool, cold = (statistics.median(results[kind]) for kind in ("pool", "cold"))
    print(f"pool / cold: {pool / cold:.3f} (medians); pool target < {TARGET_POOL_S:g} s: "
          f"{verdict(pool < TARGET_POOL_S)}")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="runs of pool and cold, alternating")
    parser.add_argument("--calls", type=int, default=30, help="exec and ssh calls of true")
    image = debian_image(parser)
    args = parser.parse_args()
    start("jobs through exec: build request -> first output line; exec against ssh")
    asyncio.run(main(image, args.runs, args.calls))
