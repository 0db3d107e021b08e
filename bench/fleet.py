"""(n) Several hosts on one PostgreSQL (issue #14): POST /vms latency with three hosts against
one, and how long a placement takes under 30 concurrent creates.

Each host is a goldclone service in this process with its own data dir, on the synthetic
hypervisor (a machine that exists in the process and has its IP at once), so that what is
measured is what the fleet adds: the admission transaction that places the VM, the handoff
to the chosen host, and PostgreSQL's notifications. All hosts share one real PostgreSQL
server (Debian's, a cluster in a temp dir, on a unix socket). Side by side, in one run:

- one host on its own database, and three hosts on another, each limited to ``--per-host``
  VMs (the single host to three times that);
- ``--sequential`` POSTs one after another (each VM deleted after), then a burst of 30
  concurrent POSTs, sent round-robin to the hosts;
- for each VM of the burst: the POST's latency (its 202 comes once the VM is placed and
  recorded), and the delay from its ``accepted`` to the first phase on the chosen host (for
  a VM handed to another host, that host's pickup).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bench._common import describe, scratch, start
from goldclone.clock import parse_rfc3339
from goldclone.settings import Limits, Settings
from tests.fast.conftest import Service, serving
from tests.postgres import PostgresCluster
from tests.servers import FileServer

BURST = 30


@contextlib.asynccontextmanager
async def fleet(
    work: Path, url: str, names: list[str], per_host: int
) -> AsyncIterator[list[Service]]:
    async with contextlib.AsyncExitStack() as stack:
        services = []
        for name in names:
            settings = Settings(
                data_dir=work / name, database_url=url, host_id=name, ip_timeout=10.0,
                limits=Limits(max_vms=per_host), callback_schedule=(0,),
            )  # fmt: skip
            services.append(await stack.enter_async_context(serving(Service(settings))))
        yield services


async def timed_post(service: Service, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    response = await service.client.post("/vms", json=body)
    took = time.perf_counter() - started
    assert response.status_code == 202, response.text
    return took, response.json()


async def measure(
    services: list[Service], body: dict[str, Any], sequential: int
) -> tuple[float, float]:
    """The median POST latency one at a time, and in the burst."""
    label = f"{len(services)} host{'s' if len(services) > 1 else ''}"
    one_by_one = []
    for i in range(sequential):
        took, vm = await timed_post(services[i % len(services)], body)
        one_by_one.append(took)
        await services[0].wait_for(vm["id"], "running")
        assert (await services[0].client.delete(f"/vms/{vm['id']}")).status_code == 204
    print(describe(f"{label}: POST, one at a time", one_by_one))

    burst = await asyncio.gather(
        *(timed_post(services[i % len(services)], body) for i in range(BURST))
    )
    vms = [await services[0].wait_for(vm["id"], "running") for _, vm in burst]
    pickups = [
        (
            parse_rfc3339(vm["timeline"][1]["at"]) - parse_rfc3339(vm["timeline"][0]["at"])
        ).total_seconds()
        for vm in vms
    ]
    print(describe(f"{label}: POST, {BURST} at once", [took for took, _ in burst]))
    print(describe(f"{label}: accepted -> first phase", pickups))
    hosts = Counter(vm["host"] for vm in vms)
    asked = Counter(services[i % len(services)].settings.host_id for i in range(BURST))
    moved = sum(vm["host"] != services[i % len(services)].settings.host_id
                for i, vm in enumerate(vms))  # fmt: skip
    print(f"  placed: {dict(sorted(hosts.items()))}; asked: {dict(sorted(asked.items()))}; "
          f"{moved} of {BURST} handed to another host")  # fmt: skip
    await asyncio.gather(*(services[0].client.delete(f"/vms/{vm['id']}") for vm in vms))
    assert (await services[0].client.get("/vms")).json()["vms"] == []
    return statistics.median(one_by_one), statistics.median(took for took, _ in burst)


async def main(per_host: int, sequential: int) -> None:
    with scratch() as work:
        served = work / "served"
        served.mkdir()
        disk = bytearray(65536)
        disk[510:512] = b"\x55\xaa"
        (served / "disk.raw").write_bytes(bytes(disk))
        cluster = PostgresCluster()
        try:
            cluster.start()
            with FileServer(served).running() as images:
                body = {"image": {"url": images.url("disk.raw"),
                                  "checksum": hashlib.sha256(disk).hexdigest()},
                        "cpus": 1, "memory": 256}  # fmt: skip
                alone = await cluster.new_database()
                async with fleet(work, alone, ["solo"], 3 * per_host) as services:
                    one = await measure(services, body, sequential)
                shared = await cluster.new_database()
                names = ["host-1", "host-2", "host-3"]
                async with fleet(work, shared, names, per_host) as services:
                    three = await measure(services, body, sequential)
                print(f"three hosts against one, median POST: {three[0] / one[0]:.2f}x one at a "
                      f"time, {three[1] / one[1]:.2f}x in the burst")  # fmt: skip
        finally:
            cluster.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-host", type=int, default=10, help="VMs each of the 3 hosts allows")
    parser.add_argument("--sequential", type=int, default=30, help="POSTs one at a time")
    args = parser.parse_args()
    start("(n) POST latency and placement: three hosts on one PostgreSQL against one")
    asyncio.run(main(args.per_host, args.sequential))
