"""(d) POST latency under load: POST /vms while 4 VMs of the cached demo image boot.

After the cache is warm, 4 VMs are created, and at once sequential POSTs follow, each with an
image URL on a closed loopback port, so that those VMs fail fast with download-failed and boot
nothing. Each POST's latency is measured by the client, from sending it to its 202. Then the
4 VMs must reach running, the others error, and every VM is deleted.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from datetime import UTC, datetime
from typing import Any

from bench._common import (
    Server,
    closed_port_url,
    demo_server,
    describe,
    ms,
    phase_at,
    scratch,
    span,
    start,
    verdict,
    vm_request,
    wait_running,
)

BOOTING = 4
TARGET_MS = 20.0


async def timed_post(server: Server, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    vm = await server.post_vm(body)
    return time.perf_counter() - started, vm


async def wait_error(server: Server, vm_id: str) -> dict[str, Any]:
    while True:
        vm: dict[str, Any] = (await server.client.get(f"/vms/{vm_id}")).json()
        if vm["status"] != "creating":
            return vm
        await asyncio.sleep(0.05)


async def main(posts: int, gap: float) -> None:
    with scratch() as work:
        async with demo_server(work) as (server, body):
            failing = vm_request(closed_port_url(), "0" * 64)  # not the cached image's key
            booting = [await timed_post(server, body) for _ in range(BOOTING)]
            latencies: list[float] = []
            sent_at: list[datetime] = []
            failed: list[str] = []
            for _ in range(posts):
                sent_at.append(datetime.now(UTC))
                latency, vm = await timed_post(server, failing)
                latencies.append(latency)
                failed.append(vm["id"])
                await asyncio.sleep(gap)
            running = [await wait_running(server, vm["id"]) for _, vm in booting]
            errors = [await wait_error(server, vm_id) for vm_id in failed]
            started = time.perf_counter()
            await server.delete_all()
            deleted = time.perf_counter() - started
            left = (await server.client.get("/vms")).json()["vms"]
    first_up = min(phase_at(vm, "running") for vm in running)
    during = sum(at < first_up for at in sent_at)
    codes = {vm["error"]["code"] for vm in errors if vm["error"]}
    print(describe(f"POST of the {BOOTING} booting VMs", [t for t, _ in booting]))
    print(describe("POST while they boot", latencies))
    print(f"  {during} of {posts} POSTs were sent before the first of the {BOOTING} VMs "
          f"was running; the failing VMs ended with {sorted(codes)}")  # fmt: skip
    boot_times = [span(vm, "accepted", "running") for vm in running]
    print(f"  the {BOOTING} VMs took {min(boot_times):.1f}-{max(boot_times):.1f} s to run; "
          f"deleting all {BOOTING + posts} VMs took {deleted:.1f} s, {len(left)} left")  # fmt: skip
    median = statistics.median(latencies)
    print()
    print(
        f"median POST latency while {BOOTING} VMs boot: {ms(median)}   "
        f"target < {TARGET_MS:.0f} ms: {verdict(median * 1000 < TARGET_MS)}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=40, help="POSTs sent while the VMs boot")
    parser.add_argument("--gap", type=float, default=0.05, help="seconds between two POSTs")
    args = parser.parse_args()
    start(f"post_latency: POST /vms while {BOOTING} VMs boot")
    asyncio.run(main(args.posts, args.gap))
