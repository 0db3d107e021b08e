"""(m) Fast start of the real Debian 12 cloud guest: POST /vms → ready (``ready_when`` tcp 22)
from a memory template and from a warm pool, against a cold boot, in one run (issue #11).

The guest of the test suite (scripts/build-debian-guest; ``--image`` or
``GOLDCLONE_DEBIAN_IMAGE``) at 1 vCPU and 1024 MB, fetched into the cache and its template
made (with ``ready_when`` tcp 22, so that sshd runs in it) before any clock starts. Each run
posts one VM of each kind in turn, with a name and an SSH key as a CI job would: from a pool of
one (refilled before its run), from the template (the pool deleted meanwhile), and cold
(``"start": "cold"``); it times POST to the first GET (every 20 ms) that shows ``running``,
which comes after the ``ready`` phase, and deletes the VM.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from pathlib import Path

from bench._common import describe, ms, scratch, serve, start, verdict
from bench.real_guest import BOOT_TIMEOUT, debian_image, prefetch, service_boot
from bench.template import KINDS, make_template, ready_for
from tests.conftest import checksum
from tests.servers import FileServer

TARGET_S, TARGET_RATIO = 6.0, 0.1
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE1Y8hEFXjCk2xPqVb6vFqX3m9QYPdFbmk1Iq4l6c6Qp bench"


async def main(image_path: Path, runs: int) -> None:
    results: dict[str, list[float]] = {kind: [] for kind in KINDS}
    with scratch() as work:
        served = work / "served"
        served.mkdir()
        (served / "debian-12.qcow2").symlink_to(image_path)
        with FileServer(served).running() as files:
            image = {"url": files.url("debian-12.qcow2"), "checksum": checksum(image_path)}
            body = {"image": image, "cpus": 1, "memory": 1024, "network_type": "nat",
                    "ssh_authorized_keys": [KEY],
                    "ready_when": {"tcp": 22, "timeout": int(BOOT_TIMEOUT)}}  # fmt: skip
            async with serve(work / "data", GOLDCLONE_IP_TIMEOUT=str(BOOT_TIMEOUT)) as server:
                await prefetch(server, image)
                await make_template(server, body, {"tcp": 22, "timeout": int(BOOT_TIMEOUT)})
                for run in range(runs):
                    for kind in KINDS if run % 2 == 0 else KINDS[::-1]:
                        request = await ready_for(server, body, kind)
                        request["name"] = f"job-{run}-{kind}"
                        elapsed, _ = await service_boot(server, request)
                        results[kind].append(elapsed)
                        print(f"run {run}: {kind:<8} POST -> ready (tcp 22) {ms(elapsed)}")
    print()
    for kind, values in results.items():
        print(describe(f"{kind} POST -> ready (tcp 22)", values))
    pool, warm, cold = (statistics.median(results[kind]) for kind in KINDS)
    met = warm < TARGET_S and warm / cold < TARGET_RATIO
    print(f"\ntemplate / cold: {warm / cold:.3f} (medians); target < {TARGET_S:g} s and < "
          f"{TARGET_RATIO}x: {verdict(met)}")  # fmt: skip
    print(f"pool / cold: {pool / cold:.3f}; pool / template: {pool / warm:.3f} (medians)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="runs of the three kinds")
    image = debian_image(parser)
    start("real guest: POST /vms -> ready from a warm pool and a template, against a cold boot")
    asyncio.run(main(image, parser.parse_args().runs))
