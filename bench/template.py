"""(j) Fast start: POST /vms → running with its IP, restored from a memory template, against a
cold boot of the same image and shape, in one run (issue #11).

The demo guest at 1 vCPU and 256 MB, from a warm cache; the template is made through the API
(``POST /images/{id}/templates``) before the clock starts. Each run posts one VM of each kind,
in turn (``"start": "cold"`` for the cold one), times POST to the first GET (every 20 ms) that
shows ``running``, and deletes it.
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


async def make_template(server: Server, body: dict[str, Any]) -> None:
    image_id = f"sha256-{body['image']['checksum']}"
    shape = {"cpus": body["cpus"], "memory": body["memory"]}
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


async def main(runs: int) -> None:
    results: dict[str, list[float]] = {"template": [], "cold": []}
    timelines: dict[str, list[float]] = {"template": [], "cold": []}
    with scratch() as work:
        async with demo_server(work) as (server, body):
            await make_template(server, body)
            for run in range(runs):
                for kind in ("template", "cold") if run % 2 == 0 else ("cold", "template"):
                    request = body if kind == "template" else {**body, "start": "cold"}
                    elapsed, timeline, started_from = await boot(server, request)
                    assert started_from == kind, started_from
                    results[kind].append(elapsed)
                    timelines[kind].append(timeline)
                    print(f"run {run}: {kind:<8} POST -> GET running {ms(elapsed)}")
    print()
    for kind in results:
        print(describe(f"{kind} POST -> GET running", results[kind]))
        print(describe(f"  {kind} timeline accepted -> running", timelines[kind]))
    warm, cold = statistics.median(results["template"]), statistics.median(results["cold"])
    met = warm < TARGET_S and warm / cold < TARGET_RATIO
    print(f"\ntemplate / cold: {warm / cold:.2f} (medians); target < {TARGET_S} s and < "
          f"{TARGET_RATIO}x: {verdict(met)}")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6, help="VMs of each kind")
    args = parser.parse_args()
    start("fast start: POST /vms -> running from a memory template, against a cold boot")
    asyncio.run(main(args.runs))
