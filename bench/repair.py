"""(h) Network repairs: how long the service takes to repair a killed dnsmasq and a deleted
bridge under a running guest, end to end and for the repair alone.

The server runs in this process (tests.harness), so that the repairs' own log records can be
read: each says how long the repair itself took. A demo guest runs on ``nat``; then, ``--runs``
times each, the network's dnsmasq is killed with SIGKILL (until GET /readyz is 200 again and a
new lease can be had), and the bridge is deleted (until the guest answers HTTP at its address
again). End to end includes the wait for the supervisor's next check (every 2 s by default).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import time

import httpx

from bench._common import describe, scratch, start, vm_request
from goldclone.demo.image import build_demo_image
from goldclone.host.commands import run
from goldclone.settings import Settings
from tests.harness import goldclone_server
from tests.servers import FileServer


class Repairs(logging.Handler):
    """Keeps the seconds of each repair that the networks log."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seconds: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.endswith("network.manager") and "in %.2f s" in str(record.msg):
            assert isinstance(record.args, tuple)
            self.seconds.append(float(record.args[-1]))  # type: ignore[arg-type]


async def until_answers(ip: str) -> None:
    async with httpx.AsyncClient(timeout=1) as client:
        while True:
            try:
                if (await client.get(f"http://{ip}/")).status_code == 200:
                    return
            except httpx.TransportError:
                await asyncio.sleep(0.05)


async def main(runs: int) -> None:
    repairs = Repairs()
    logging.getLogger("goldclone").addHandler(repairs)
    logging.getLogger("goldclone").setLevel(logging.WARNING)
    dnsmasq_total, dnsmasq_alone, bridge_total, bridge_alone = [], [], [], []
    with scratch() as work:
        served = work / "served"
        served.mkdir()
        demo = served / "demo.tar.gz"
        digest = await build_demo_image(demo)
        with FileServer(served).running() as files:
            settings = Settings(data_dir=work / "d", shutdown_timeout=5.0)
            async with goldclone_server(settings) as server:
                vm = await server.boot(vm_request(files.url(demo.name), digest))
                assert vm["status"] == "running", vm
                pid_file = settings.data_dir.absolute() / "networks" / "nat" / "dnsmasq.pid"
                for _ in range(runs):
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
                    began, seen = time.perf_counter(), len(repairs.seconds)
                    while (await server.client.get("/readyz")).status_code != 200:
                        await asyncio.sleep(0.02)
                    dnsmasq_total.append(time.perf_counter() - began)
                    dnsmasq_alone += repairs.seconds[seen:]

                    await run("ip", "link", "del", "dev", settings.network.nat_bridge)
                    began, seen = time.perf_counter(), len(repairs.seconds)
                    await asyncio.wait_for(until_answers(vm["ip_address"]), 30)
                    bridge_total.append(time.perf_counter() - began)
                    bridge_alone += repairs.seconds[seen:]
                await server.delete(vm["id"])
    print(describe("dnsmasq killed -> /readyz ok", dnsmasq_total))
    print(describe("  the restart alone", dnsmasq_alone))
    print(describe("bridge deleted -> guest answers", bridge_total))
    print(describe("  the repair alone", bridge_alone))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    start("(h) network repairs: a killed dnsmasq, a deleted bridge")
    asyncio.run(main(args.runs))
