"""(i) A real Debian 12 cloud guest: POST /vms to its IP and to ready (``ready_when`` tcp 22),
against a raw QEMU cold boot of the same disk to its lease and to sshd.

The guest is the one the test suite boots (scripts/build-debian-guest; ``--image`` or
``GOLDCLONE_DEBIAN_IMAGE``), at 1 vCPU and 1024 MB, served as a bare qcow2 and fetched into the
cache before the clock starts. Each run has three boots, in turn: the service without
``ready_when`` (POST to the GET that shows ``running``: the IP is known), the service with
``{"tcp": 22}`` (POST to ``running`` after the ``ready`` phase), and a raw qemu of a linked clone
of the same gold disk with the same NoCloud seed, timed from launch to its lease and to port 22
accepting a connection (polled every 20 ms). All boots are cold: nothing is restored.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path
from typing import Any

from bench._common import QEMU, Server, describe, ms, scratch, serve, span, start, wait_running
from bench.boot import RawBoot
from goldclone.drivers.qemu.accel import choose_accel
from goldclone.guest.config import GuestConfig
from goldclone.images.cache import ImageCache
from goldclone.models import ImageSpec
from tests.conftest import checksum
from tests.servers import FileServer

BOOT_TIMEOUT = 900.0
SIDES = ("service POST -> IP", "service POST -> ready (tcp 22)", "raw launch -> lease",
         "raw launch -> sshd")  # fmt: skip


def debian_image(parser: argparse.ArgumentParser) -> Path:
    """The Debian guest's qcow2 that ``--image`` (which this adds to ``parser``) or
    ``GOLDCLONE_DEBIAN_IMAGE`` names, with the arguments parsed; the parser's error without."""
    parser.add_argument(
        "--image",
        type=Path,
        default=os.environ.get("GOLDCLONE_DEBIAN_IMAGE"),
        help="the Debian guest's qcow2 (scripts/debian-guest prints it)",
    )
    args = parser.parse_args()
    if args.image is None:
        parser.error("give --image or set GOLDCLONE_DEBIAN_IMAGE (see scripts/debian-guest)")
    return Path(args.image).absolute()


async def prefetch(server: Server, image: dict[str, str]) -> None:
    response = await server.client.post("/images", json=image)
    if response.status_code != 202:
        raise RuntimeError(f"POST /images answered {response.status_code}: {response.text}")
    image_id = response.json()["id"]
    while True:
        images = (await server.client.get("/images")).json()["images"]
        [found] = [i for i in images if i["id"] == image_id]
        if found["status"] == "ready":
            return
        if found["status"] == "error":
            raise RuntimeError(f"the image did not download: {found}")
        await asyncio.sleep(0.5)


async def service_boot(server: Server, body: dict[str, Any]) -> tuple[float, float]:
    """Seconds from sending POST to the GET that shows it running, and the timeline's
    accepted -> running span."""
    started = time.perf_counter()
    vm = await server.post_vm(body)
    vm = await wait_running(server, vm["id"], timeout=BOOT_TIMEOUT)
    elapsed = time.perf_counter() - started
    await server.delete(vm["id"])
    return elapsed, span(vm, "accepted", "running")


async def main(image_path: Path, runs: int) -> None:
    results: dict[str, list[float]] = {side: [] for side in SIDES}
    timelines: dict[str, list[float]] = {side: [] for side in SIDES[:2]}
    with scratch() as work:
        served = work / "served"
        served.mkdir()
        (served / "debian-12.qcow2").symlink_to(image_path)
        with FileServer(served).running() as files:
            image = {"url": files.url("debian-12.qcow2"), "checksum": checksum(image_path)}
            body = {"image": image, "cpus": 1, "memory": 1024, "network_type": "nat"}
            ready = {**body, "ready_when": {"tcp": 22, "timeout": int(BOOT_TIMEOUT)}}
            async with serve(work / "data", GOLDCLONE_IP_TIMEOUT=str(BOOT_TIMEOUT)) as server:
                await prefetch(server, image)
                gold = ImageCache(server.data_dir, server.client).cached(
                    ImageSpec.model_validate(image)
                )
                assert gold is not None
                accel = await choose_accel("auto", QEMU)
                guest = GuestConfig("raw-boot", "raw-boot")
                raw = RawBoot(work / "raw", gold.disk.path, 1, 1024, accel, guest)
                with raw.network():
                    for run in range(runs):
                        for side, request in zip(SIDES[:2], (body, ready), strict=True):
                            elapsed, timeline = await service_boot(server, request)
                            results[side].append(elapsed)
                            timelines[side].append(timeline)
                            print(f"run {run}: {side:<34} {ms(elapsed)}")
                        leased, sshd = await asyncio.to_thread(raw.boot, run, 22)
                        assert sshd is not None
                        results[SIDES[2]].append(leased)
                        results[SIDES[3]].append(sshd)
                        print(f"run {run}: {SIDES[2]:<34} {ms(leased)}")
                        print(f"run {run}: {SIDES[3]:<34} {ms(sshd)}")
    print()
    for side, values in results.items():
        print(describe(side, values))
    for side, values in timelines.items():
        print(describe(f"  timeline, {side.removeprefix('service POST -> ')}", values))
    print()
    for service_side, raw_side in ((SIDES[0], SIDES[2]), (SIDES[1], SIDES[3])):
        ratio = statistics.median(results[service_side]) / statistics.median(results[raw_side])
        print(f"{service_side} / {raw_side}: {ratio:.2f} (medians)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="runs of the three boots")
    image = debian_image(parser)
    start("real guest: POST /vms -> IP and -> ready, against raw qemu -> lease and -> sshd")
    asyncio.run(main(image, parser.parse_args().runs))
