"""(j) Fast start: POST /vms → running with its IP, claimed from a warm pool and restored from a
memory template, against a cold boot of the same image and shape, in one run (issue #11).

The demo guest at 1 vCPU and 256 MB, from a warm cache; the template is made through the API
(``POST /images/{id}/templates``) before the clock starts. Each run posts one VM of each kind,
in turn: from a pool of one (``PUT /pools/bench``, refilled before each of its runs), from the
template (the pool deleted meanwhile), and cold (``"start": "cold"``); it times POST to the
first GET (every 20 ms) that shows ``running``, and deletes the VM.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from bench._common import (
    Server,
    demo_server,
    describe,
    ms,
    scratch,
    span,
    start,
    verdict,
    wait_running,
)

TARGET_S, TARGET_RATIO = 1.5, 0.35
TARGET_POOL_S = 0.15
KINDS = ("pool", "template", "cold")


async def make_template(
    server: Server, body: dict[str, Any], ready_when: dict[str, Any] | None = None
) -> None:
    """Make the template of the body's image and shape, and wait until it is ready."""
    image_id = f"sha256-{body['image']['checksum']}"
    shape = {"cpus": body["cpus"], "memory": body["memory"], "ready_when": ready_when}
    response = await server.client.post(f"/images/{image_id}/templates", json=shape)
    if response.status_code != 202:
        raise RuntimeError(f"POST templates answered {response.status_code}: {response.text}")
    while True:
        [image] = [i for i in (await server.client.get("/images")).json()["images"]
                   if i["id"] == image_id]  # fmt: skip
        [template] = image["templates"]
        if template["status"] == "ready":
            return
        if template["status"] == "error":
            raise RuntimeError(f"the template failed: {template['error']}")
        await asyncio.sleep(0.2)


async def boot(server: Server, body: dict[str, Any]) -> tuple[float, float, str]:
    started = time.perf_counter()
    vm = await wait_running(server, (await server.post_vm(body))["id"])
    elapsed = time.perf_counter() - started
    await server.delete(vm["id"])
    return elapsed, span(vm, "accepted", "running"), vm["started_from"]


async def fill_pool(server: Server, body: dict[str, Any]) -> None:
    """``PUT /pools/bench`` of one VM of the body's image and shape; wait until it is ready."""
    pool = {key: body[key] for key in ("image", "cpus", "memory")} | {"size": 1}
    response = await server.client.put("/pools/bench", json=pool)
    if response.status_code not in (200, 201):
        raise RuntimeError(f"PUT /pools answered {response.status_code}: {response.text}")
    while (found := (await server.client.get("/pools/bench")).json())["ready"] < 1:
        if found["error"] is not None:
            raise RuntimeError(f"the pool cannot fill: {found['error']}")
        await asyncio.sleep(0.05)


async def ready_for(server: Server, body: dict[str, Any], kind: str) -> dict[str, Any]:
    """Set the server up for a VM of ``kind`` (a pool of one, full, for ``pool``; no pool for
    the others) and return the request that gets one."""
    if kind == "pool":
        await fill_pool(server, body)
    elif (await server.client.get("/pools")).json()["pools"]:
        await server.client.delete("/pools/bench")
    return {**body, "start": "cold" if kind == "cold" else "auto"}


async def main(runs: int) -> None:
    results: dict[str, list[float]] = {kind: [] for kind in KINDS}
    timelines: dict[str, list[float]] = {kind: [] for kind in KINDS}
    with scratch() as work:
        async with demo_server(work) as (server, body):
            await make_template(server, body)
            for run in range(runs):
                for kind in KINDS if run % 2 == 0 else KINDS[::-1]:
                    request = await ready_for(server, body, kind)
                    elapsed, timeline, started_from = await boot(server, request)
                    assert started_from == kind, started_from
                    results[kind].append(elapsed)
                    timelines[kind].append(timeline)
                    print(f"run {run}: {kind:<8} POST -> GET running {ms(elapsed)}")
    print()
    for kind in results:
        print(describe(f"{kind} POST -> GET running", results[kind]))
        print(describe(f"  {kind} timeline accepted -> running", timelines[kind]))
    pool, warm, cold = (statistics.median(results[kind]) for kind in KINDS)
    met = warm < TARGET_S and warm / cold < TARGET_RATIO
    print(f"\ntemplate / cold: {warm / cold:.2f} (medians); target < {TARGET_S} s and < "
          f"{TARGET_RATIO}x: {verdict(met)}")  # fmt: skip
    print(
        f"pool / cold: {pool / cold:.3f}, pool / template: {pool / warm:.3f} (medians); "
        f"target: pool < {TARGET_POOL_S * 1000:.0f} ms: {verdict(pool < TARGET_POOL_S)}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6, help="VMs of each kind")
    args = parser.parse_args()
    start("fast start: POST /vms -> running from a warm pool and from a memory template, "
          "against a cold boot")  # fmt: skip
    asyncio.run(main(args.runs))
