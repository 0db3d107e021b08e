"""(c) Fetch: from an image URL to a ready gold image, for a package of about 1 GB, through a
real POST to a real server, against ``curl -s -o FILE URL && tar xzf FILE -C DIR``.

The package is a tar.gz of one 1 GiB raw disk: the demo guest's 64 MiB boot disk followed by
mixed content in 1 MiB blocks (45 % random, 40 % text-like, 15 % zeros), so gzip has real work
and the VM still boots. A real HTTP server on loopback serves it to both sides.

Each service run starts a fresh ``goldclone serve`` (empty cache), POSTs a VM and polls for the
gold image's folder every 20 ms; the timeline's downloading -> cloning span is the fetch alone.
The server's peak RSS is its VmHWM in /proc/PID/status once the VM runs. The two sides
alternate, and everything is synced between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from bench._common import (
    POLL,
    Stopwatch,
    describe,
    scratch,
    serve,
    span,
    start,
    verdict,
    vm_request,
    wait_running,
)
from goldclone.demo.image import build_demo_image
from tests.packages import extract_disk
from tests.servers import FileServer

SIZE = 1 << 30
BLOCK = 1 << 20
TARGET_RATIO, TARGET_RSS_MB = 1.3, 150.0
CURL_TAR = 'curl -s -o "$0" "$1" && tar xzf "$0" -C "$2"'


def text_pool(rng: random.Random, size: int) -> bytes:
    """Text-like bytes: lines of words drawn from a vocabulary of 3000 made-up words."""
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    vocab = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(3000)]
    lines: list[str] = []
    length = 0
    while length < size:
        words = rng.choices(vocab, k=12)
        lines.append(" ".join(words) + "\n")
        length += len(lines[-1])
    return "".join(lines).encode()


def make_disk(boot_disk: Path, out: Path) -> None:
    """A 1 GiB raw disk: ``boot_disk`` (qcow2) as raw, then mixed blocks up to SIZE."""
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(boot_disk), str(out)],
                   check=True)  # fmt: skip
    rng = random.Random(1)
    pool = text_pool(rng, 4 * BLOCK)
    with out.open("ab") as disk:
        for _ in range((SIZE - out.stat().st_size) // BLOCK):
            kind = rng.random()
            if kind < 0.45:
                disk.write(rng.randbytes(BLOCK))
            elif kind < 0.85:
                offset = rng.randrange(len(pool) - BLOCK)
                disk.write(pool[offset : offset + BLOCK])
            else:
                disk.write(bytes(BLOCK))


async def make_package(work: Path, served: Path) -> tuple[Path, str]:
    """The ~1 GB tar.gz in ``served`` and its sha256."""
    demo = work / "demo.tar.gz"
    await build_demo_image(demo)
    with Stopwatch() as made:
        package = await asyncio.to_thread(pack, extract_disk(demo, work / "boot.qcow2"), served)
    with package.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    demo.unlink()
    size = package.stat().st_size
    print(f"package: {SIZE / 2**20:.0f} MiB disk -> {size / 2**20:.0f} MiB tar.gz "
          f"({SIZE / size:.2f}:1), made in {made.seconds:.0f} s")  # fmt: skip
    return package, digest


def pack(boot_disk: Path, served: Path) -> Path:
    """``served/big.tar.gz`` holding ``disk.raw``, made from ``boot_disk``, which is removed."""
    raw = boot_disk.parent / "disk.raw"
    make_disk(boot_disk, raw)
    package = served / "big.tar.gz"
    subprocess.run(["tar", "-czf", str(package), "-C", str(raw.parent), raw.name], check=True)
    raw.unlink()
    boot_disk.unlink()
    return package


def curl_tar(url: str, work: Path) -> float:
    """Seconds for curl + tar xzf into a fresh folder, which is removed again."""
    out = work / "curl"
    out.mkdir()
    try:
        with Stopwatch() as sw:
            subprocess.run(["sh", "-c", CURL_TAR, str(work / "pkg"), url, str(out)], check=True)
        assert (out / "disk.raw").stat().st_size == SIZE
    finally:
        shutil.rmtree(out)
        (work / "pkg").unlink(missing_ok=True)
        os.sync()
    return sw.seconds


def proc_status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


async def service_fetch(body: dict[str, Any], data_dir: Path) -> dict[str, float]:
    """Through a fresh server: POST sent -> gold image folder there, and the server's memory."""
    gold = data_dir / "images" / f"sha256-{body['image']['checksum']}"
    try:
        async with serve(data_dir) as server:
            pid = server.process.pid
            result = {"rss_idle": proc_status_mb(pid, "VmRSS")}
            started = time.perf_counter()
            vm = await server.post_vm(body)
            while not gold.is_dir():
                await asyncio.sleep(POLL)
            result["seconds"] = time.perf_counter() - started
            vm = await wait_running(server, vm["id"])
            result["timeline"] = span(vm, "downloading", "cloning")
            result["hwm"] = proc_status_mb(pid, "VmHWM")
    finally:
        await asyncio.to_thread(shutil.rmtree, data_dir)
        os.sync()
    return result


async def main(runs: int) -> None:
    with scratch() as work:
        served = work / "served"
        served.mkdir()
        package, digest = await make_package(work, served)
        with FileServer(served).running() as files:
            url = files.url(package.name)
            body = vm_request(url, digest)
            curl: list[float] = []
            service: list[dict[str, float]] = []
            for run in range(runs):
                for side in ("curl", "service") if run % 2 == 0 else ("service", "curl"):
                    if side == "curl":
                        curl.append(await asyncio.to_thread(curl_tar, url, work))
                        print(f"run {run}: curl + tar xzf             {curl[-1]:6.2f} s")
                        continue
                    s = await service_fetch(body, work / f"data{run}")
                    service.append(s)
                    print(f"run {run}: service POST -> gold image  {s['seconds']:6.2f} s   "
                          f"timeline downloading -> cloning {s['timeline']:6.2f} s   "
                          f"server RSS idle {s['rss_idle']:.0f} MB, "
                          f"peak {s['hwm']:.0f} MB")  # fmt: skip
    print()
    by_poll = [s["seconds"] for s in service]
    print(describe("curl + tar xzf", curl))
    print(describe("service POST -> gold image", by_poll))
    print(describe("service downloading -> cloning", [s["timeline"] for s in service]))
    ratio = statistics.median(by_poll) / statistics.median(curl)
    peak = max(s["hwm"] for s in service)
    print()
    print(f"service / curl+tar: {ratio:.2f}x   target < {TARGET_RATIO}x: "
          f"{verdict(ratio < TARGET_RATIO)}")  # fmt: skip
    print(
        f"server peak RSS (VmHWM): max {peak:.0f} MB over the runs   "
        f"target < {TARGET_RSS_MB:.0f} MB: {verdict(peak < TARGET_RSS_MB)}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="fetches of each kind")
    args = parser.parse_args()
    start("fetch: URL -> gold image of a ~1 GB package, against curl + tar xzf")
    asyncio.run(main(args.runs))
