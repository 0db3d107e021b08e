"""(k) Density and (l) concurrency of VMs restored from a memory template (issue #11).

(k) 20 demo VMs restored from one template against 20 cold-booted ones (``"start": "cold"``),
each set posted at once and all running together: the sum of their QEMUs' PSS (proportional
set size, from ``/proc/PID/smaps_rollup``, which splits each shared page among the processes
that map it), and the time from the first POST until every guest answers HTTP on port 80.
(l) 50 concurrent POSTs from the template: whether all 50 run with distinct IPs, and how long
it took until every one answered HTTP.

The demo guest at 1 vCPU and 256 MB, from a warm cache; the template is made before any clock
starts. Each set is deleted before the next.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import httpx

from bench._common import Server, demo_server, scratch, start, verdict, wait_running
from bench.template import make_template

TARGET_MEMORY, TARGET_TIME = 0.5, 0.25
UP_TIMEOUT = 1800.0
_NO_KEEPALIVE = httpx.Limits(max_keepalive_connections=0)
"""Each guest is asked once: a kept connection would only hold its httpd's process."""


async def answers_http(client: httpx.AsyncClient, ip: str, deadline: float) -> None:
    """Wait until ``ip`` answers HTTP. A connection is given up after 0.5 s and tried again: a
    SYN sent as the guest takes its lease can go unanswered, and the kernel's first resend of
    it comes only after a second."""
    while True:
        try:
            if (await client.get(f"http://{ip}/")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{ip} did not answer HTTP")
        await asyncio.sleep(0.05)


async def burst(server: Server, body: dict[str, Any], count: int) -> tuple[float, list[str]]:
    """Post ``count`` VMs at once; the seconds until all answer HTTP, and their IPs."""
    started = time.perf_counter()
    deadline = started + UP_TIMEOUT
    posted = await asyncio.gather(*(server.post_vm(body) for _ in range(count)))

    # One client for all: each new one loads the CA certificates into a TLS context, tens of
    # milliseconds of CPU that the guests being measured would wait for.
    guests = httpx.AsyncClient(timeout=httpx.Timeout(2, connect=0.5), limits=_NO_KEEPALIVE)

    async def up(vm_id: str) -> str:
        vm = await wait_running(server, vm_id, UP_TIMEOUT)
        await answers_http(guests, vm["ip_address"], deadline)
        return str(vm["ip_address"])

    async with guests:
        ips = await asyncio.gather(*(up(vm["id"]) for vm in posted))
    return time.perf_counter() - started, ips


def qemu_pss_mb(data_dir: Path) -> tuple[int, float]:
    """How many QEMUs of this server run, and the sum of their PSS in MB."""
    count, total_kb = 0, 0
    marker = str(data_dir.absolute()).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            # QEMU itself, not the shell that waits for it (whose command line is QEMU's too)
            if b"qemu-system" not in cmdline.split(b"\0")[0] or marker not in cmdline:
                continue
            rollup = (entry / "smaps_rollup").read_text()
        except OSError:
            continue
        count += 1
        total_kb += next(int(line.split()[1]) for line in rollup.splitlines()
                         if line.startswith("Pss:"))  # fmt: skip
    return count, total_kb / 1024


async def main(vms: int, concurrent: int) -> None:
    with scratch() as work:
        async with demo_server(work, GOLDCLONE_IP_TIMEOUT=str(UP_TIMEOUT)) as (server, body):
            await make_template(server, body)
            found: dict[str, tuple[float, float]] = {}
            for kind in ("template", "cold"):
                request = body if kind == "template" else {**body, "start": "cold"}
                seconds, ips = await burst(server, request, vms)
                count, pss = qemu_pss_mb(server.data_dir)
                assert count == vms and len(set(ips)) == vms, (count, ips)
                found[kind] = (pss, seconds)
                print(f"(k) {vms} {kind:<8} all answer HTTP after {seconds:6.1f} s; PSS of "
                      f"their {count} QEMUs {pss:7.0f} MB ({pss / vms:.0f} MB each)")  # fmt: skip
                await server.delete_all()
            memory = found["template"][0] / found["cold"][0]
            speed = found["template"][1] / found["cold"][1]
            print(f"(k) template / cold: memory {memory:.2f} (target < {TARGET_MEMORY}), time "
                  f"{speed:.2f} (target < {TARGET_TIME}): "
                  f"{verdict(memory < TARGET_MEMORY and speed < TARGET_TIME)}")  # fmt: skip
            if not concurrent:
                return
            print()
            seconds, ips = await burst(server, body, concurrent)
            count, pss = qemu_pss_mb(server.data_dir)
            distinct = len(set(ips))
            print(f"(l) {concurrent} concurrent from the template: {distinct} distinct IPs, all "
                  f"answering HTTP after {seconds:.1f} s; PSS {pss:.0f} MB "
                  f"({pss / count:.0f} MB each): {verdict(distinct == concurrent)}")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=20, help="VMs of each kind for (k)")
    parser.add_argument(
        "--concurrent", type=int, default=50, help="VMs posted at once for (l); 0 skips it"
    )
    args = parser.parse_args()
    start("density and concurrency of VMs restored from a memory template")
    asyncio.run(main(args.vms, args.concurrent))
