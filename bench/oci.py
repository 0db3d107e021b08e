"""(r) Registry images (issue #30): a pull of a 1 GiB containerDisk from a real registry into a
ready gold image, through a real POST to a real server, against ``skopeo copy`` of the same
image to a local directory; and a new version of a disk artifact that changes 10 % of its
disk, pulled after the first: its time and the bytes the registry served.

The disk is fetch.py's: the demo guest's boot disk followed by mixed 1 MiB blocks (45 %
random, 40 % text-like, 15 % zeros), in one gzip tar layer under ``/disk/``. The registry is
Debian's docker-registry on loopback (``tests.registry``). Each service run starts a fresh
``goldclone serve`` (empty cache) and POSTs ``/images``; its time runs to the image being
``ready``, and its peak RSS is its VmHWM. skopeo copies to a fresh ``dir:`` (it keeps the
layer as the registry has it: no unpacking). The two sides alternate.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import shutil
import statistics
import subprocess
import tarfile
import time
from pathlib import Path

from bench._common import POLL, Stopwatch, describe, scratch, serve, start, verdict
from bench.fetch import SIZE, make_disk, proc_status_mb
from goldclone.demo.image import build_demo_image
from tests.packages import extract_disk
from tests.registry import Registry, client, push_artifact, push_image, running_registry

TARGET_RATIO, TARGET_RSS_MB = 1.2, 150.0
CHUNK = 64 << 20
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def layer_of(disk: Path, out: Path) -> None:
    """A containerDisk's layer: ``disk`` as ``disk/disk.raw`` in a gzip tar, at gzip's level 6."""
    with (
        gzip.GzipFile(out, "wb", compresslevel=6, mtime=0) as packed,
        tarfile.open(fileobj=packed, mode="w") as tar,
    ):
        tar.add(disk, arcname="disk/disk.raw")


def skopeo(registry: Registry, reference: str, work: Path, untar: bool = False) -> float:
    """``skopeo copy`` to a fresh ``dir:``; with ``untar``, then ``tar xzf`` of its layer (what
    it takes to have the disk itself)."""
    out = work / "skopeo"
    try:
        with Stopwatch() as sw:
            subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                            f"docker://{reference}", f"dir:{out}"], check=True)  # fmt: skip
            if untar:
                layer = max(out.iterdir(), key=lambda path: path.stat().st_size)
                subprocess.run(["tar", "xzf", str(layer), "-C", str(out)], check=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
    return sw.seconds


async def pull(registry: Registry, references: list[str], data_dir: Path) -> list[dict[str, float]]:
    """Each reference pulled in turn through one fresh server: seconds, bytes the registry
    served for it, and the server's peak RSS."""
    found = []
    try:
        async with serve(data_dir, GOLDCLONE_REGISTRY_INSECURE=registry.host,
                         GOLDCLONE_DOWNLOAD_TIMEOUT="120") as server:  # fmt: skip
            for reference in references:
                served = len(registry.requests())
                started = time.perf_counter()
                posted = await server.client.post("/images", json={"oci": reference})
                assert posted.status_code == 202, posted.text
                image_id = posted.json()["id"]
                while (image := (await server.client.get(f"/images/{image_id}")).json())[
                    "status"
                ] != "ready":
                    assert image["status"] == "downloading", image
                    await asyncio.sleep(POLL)
                seconds = time.perf_counter() - started
                fetched = sum(s.written for s in registry.requests()[served:]
                              if s.method == "GET" and "/blobs/" in s.path)  # fmt: skip
                found.append({"seconds": seconds, "bytes": fetched,
                              "hwm": proc_status_mb(server.process.pid, "VmHWM")})  # fmt: skip
    finally:
        await asyncio.to_thread(shutil.rmtree, data_dir)
        os.sync()
    return found


async def main(runs: int) -> None:
    with scratch() as work, running_registry(work) as registry:
        demo = work / "demo.tar.gz"
        await build_demo_image(demo)
        disk = work / "disk.raw"
        await asyncio.to_thread(make_disk, extract_disk(demo, work / "boot.qcow2"), disk)
        layer = work / "layer.tar.gz"
        await asyncio.to_thread(layer_of, disk, layer)
        with client(registry, timeout=600) as http:
            await asyncio.to_thread(
                push_image, http, "bench/disk", "v1", [layer.read_bytes()], layer_type=GZIP_LAYER
            )
        print(f"containerDisk: {SIZE >> 20} MiB disk in a {layer.stat().st_size >> 20} MiB layer")
        layer.unlink()
        # the artifact, and its second version: 10 % of the disk (contiguous) changed
        await asyncio.to_thread(push_artifact, registry, "bench/artifact", "v1", disk, CHUNK)
        with disk.open("r+b") as f:
            f.seek(SIZE // 2)
            f.write(os.urandom(SIZE // 10))
        await asyncio.to_thread(push_artifact, registry, "bench/artifact", "v2", disk, CHUNK)
        disk.unlink()
        base = f"{registry.host}/bench/disk:v1"
        tool: list[float] = []
        untarred: list[float] = []
        service: list[dict[str, float]] = []
        for run in range(runs):
            for side in ("skopeo", "service") if run % 2 == 0 else ("service", "skopeo"):
                if side == "skopeo":
                    tool.append(await asyncio.to_thread(skopeo, registry, base, work))
                    print(f"run {run}: skopeo copy to dir:            {tool[-1]:6.2f} s")
                    untarred.append(await asyncio.to_thread(skopeo, registry, base, work, True))
                    print(f"run {run}: skopeo copy + tar xzf:         {untarred[-1]:6.2f} s")
                    continue
                [result] = await pull(registry, [base], work / f"data{run}")
                service.append(result)
                print(f"run {run}: service POST -> ready image     {result['seconds']:6.2f} s   "
                      f"peak RSS {result['hwm']:.0f} MB")  # fmt: skip
        versions = [f"{registry.host}/bench/artifact:{tag}" for tag in ("v1", "v2")]
        first, second = await pull(registry, versions, work / "versions")
    print()
    print(describe("skopeo copy", tool))
    print(describe("skopeo copy + tar xzf", untarred))
    print(describe("service pull", [s["seconds"] for s in service]))
    ratio = statistics.median(s["seconds"] for s in service) / statistics.median(tool)
    peak = max(s["hwm"] for s in service)
    met = verdict(ratio <= TARGET_RATIO)
    print(f"service / skopeo: {ratio:.2f}x   target <= {TARGET_RATIO}x: {met}")
    unpacked = statistics.median(s["seconds"] for s in service) / statistics.median(untarred)
    print(f"service / (skopeo + tar xzf): {unpacked:.2f}x")
    met = verdict(peak < TARGET_RSS_MB)
    print(f"server peak RSS: {peak:.0f} MB   target < {TARGET_RSS_MB:.0f} MB: {met}")
    print(f"disk artifact v1: {first['seconds']:.2f} s, {first['bytes'] / 2**20:.0f} MiB fetched")
    share = second["bytes"] / first["bytes"]
    print(f"disk artifact v2 (10 % changed): {second['seconds']:.2f} s, "
          f"{second['bytes'] / 2**20:.0f} MiB fetched ({share:.1%} of v1's)")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="pulls of each kind")
    args = parser.parse_args()
    start("oci: a 1 GiB containerDisk pulled, against skopeo copy; a disk artifact's new version")
    asyncio.run(main(args.runs))
