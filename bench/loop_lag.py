"""(g) Event-loop lag: how late the service's event loop runs a timer while a 1 GiB image is
fetched and two VMs are destroyed, against the same loop with nothing to do.

The server runs in this process (tests.harness), so that a probe task on its own event loop
can see every stall: it sleeps 5 ms at a time and records how much later than asked it wakes.
The image is a bare 1 GiB raw disk (the demo guest's disk, then mixed blocks, as in fetch.py),
served by a real HTTP server on loopback, so the service downloads, hashes and copies 1 GiB.
Two demo VMs are booted first; then, in one go, a VM of the 1 GiB image is posted and both
demo VMs are deleted. The probe runs until the gold image is ready and both deletes are done.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import time

from bench._common import percentile, scratch, start, verdict, vm_request
from bench.fetch import make_disk
from goldclone.demo.image import build_demo_image
from goldclone.settings import Settings
from tests.harness import goldclone_server
from tests.packages import extract_disk
from tests.servers import FileServer

TICK = 0.005
TARGET_P99 = 0.020


class LagProbe:
    """Sleeps ``TICK`` at a time on the running loop and records each wake-up's delay."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LagProbe:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time()
            await asyncio.sleep(TICK)
            self.delays.append(loop.time() - asked - TICK)


def summary(label: str, delays: list[float]) -> str:
    return (
        f"{label:<34} p50 {percentile(delays, 50) * 1000:6.2f} ms   "
        f"p99 {percentile(delays, 99) * 1000:6.2f} ms   max {max(delays) * 1000:7.2f} ms   "
        f"({len(delays)} ticks)"
    )


async def main(idle_seconds: float) -> None:
    with scratch() as work:
        served = work / "served"
        served.mkdir()
        demo = served / "demo.tar.gz"
        demo_sum = await build_demo_image(demo)
        big = served / "big.raw"
        make_disk(extract_disk(demo, work / "boot"), big)
        with big.open("rb") as f:
            big_sum = hashlib.file_digest(f, "sha256").hexdigest()
        settings = Settings(data_dir=work / "d", shutdown_timeout=5.0, download_timeout=30.0)
        with FileServer(served).running() as files:
            async with goldclone_server(settings) as server:
                booted = [await server.boot(vm_request(files.url(demo.name), demo_sum))
                          for _ in range(2)]  # fmt: skip
                assert all(vm["status"] == "running" for vm in booted), booted
                async with LagProbe() as idle:
                    await asyncio.sleep(idle_seconds)
                began = time.perf_counter()
                async with LagProbe() as busy:
                    big_vm = await server.post_vm(vm_request(files.url(big.name), big_sum))
                    await asyncio.gather(
                        *(server.delete(vm["id"]) for vm in booted),
                        server.wait_for_phase(big_vm["id"], "cloning", timeout=600),
                    )
                took = time.perf_counter() - began
                gold = work / "d" / "images" / f"sha256-{big_sum}"
                assert gold.is_dir(), "the 1 GiB image did not become a gold image"
                await server.delete(big_vm["id"])
    print(summary("idle (2 VMs running)", idle.delays))
    print(summary("fetch 1 GiB + destroy 2 VMs", busy.delays))
    ratio = percentile(busy.delays, 99) / max(percentile(idle.delays, 99), 1e-6)
    print(f"busy/idle p99 ratio: {ratio:.1f}x; the busy phase took {took:.1f} s")
    met = percentile(busy.delays, 99) < TARGET_P99
    print(f"target p99 < {TARGET_P99 * 1000:.0f} ms while busy: {verdict(met)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--idle", type=float, default=3.0, help="seconds of the idle phase")
    args = parser.parse_args()
    start("(g) event-loop lag while 1 GiB is fetched and two VMs are destroyed")
    asyncio.run(main(args.idle))
