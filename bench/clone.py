"""(b) Clone: QemuDriver.clone (``qemu-img create -b GOLD -F qcow2``) of a 100 MB and a 4 GB
gold image whose clusters are all really written, against a full copy (``cp``) of each.

The gold images are made with qemu-io writing a non-zero pattern over the whole disk, so every
cluster is allocated. Clones alternate between the two sizes. ``cp --reflink=never`` forces a
real copy; the source is in the page cache, everything is synced before each copy, and the copy
is timed both alone (into the page cache) and with ``sync FILE`` (on disk).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import time
import uuid
from pathlib import Path

from bench._common import QEMU, Stopwatch, describe, scratch, start, verdict
from goldclone.drivers.qemu import QemuDriver
from goldclone.drivers.qemu.network import Networks
from goldclone.images.checks import DiskImage
from goldclone.images.gold import GoldImage
from goldclone.settings import NetworkConfig

SIZES = {"100 MB": 100 << 20, "4 GB": 4 << 30}
WRITE = 256 << 20
NOISE = 1.5
"""Two medians are "the same within noise" when the larger is under 1.5 times the smaller."""


def make_gold(path: Path, size: int) -> None:
    """A qcow2 of ``size`` bytes with every cluster written."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    writes = [f"write -q -P 0xa5 {offset} {min(WRITE, size - offset)}"
              for offset in range(0, size, WRITE)]  # fmt: skip
    subprocess.run(["qemu-io", "-f", "qcow2", *(a for w in writes for a in ("-c", w)), str(path)],
                   check=True)  # fmt: skip


def full_copy(source: Path, target: Path) -> tuple[float, float]:
    """Seconds that ``cp`` takes to copy ``source``, and then with ``sync`` of the copy too.

    The copy is removed again."""
    os.sync()
    started = time.perf_counter()
    subprocess.run(["cp", "--reflink=never", str(source), str(target)], check=True)
    copied = time.perf_counter()
    subprocess.run(["sync", str(target)], check=True)
    synced = time.perf_counter()
    target.unlink()
    return copied - started, synced - started


async def main(runs: int, copies: int) -> None:
    with scratch() as work:
        golds: dict[str, GoldImage] = {}
        for name, size in SIZES.items():
            path = work / f"gold-{name.replace(' ', '')}.qcow2"
            with Stopwatch() as made:
                await asyncio.to_thread(make_gold, path, size)
            golds[name] = GoldImage(name, work, DiskImage(path, "qcow2"), None)
            allocated = path.stat().st_blocks * 512
            print(f"gold {name}: {allocated / 2**20:.0f} MiB allocated on disk "
                  f"(made in {made.seconds:.1f} s)")  # fmt: skip
        networks = Networks(NetworkConfig(), work / "data" / "networks")  # unused by clone
        driver = QemuDriver(work / "data", networks, QEMU)
        clones: dict[str, list[float]] = {name: [] for name in SIZES}
        for _ in range(runs):
            for name, gold in golds.items():
                vm_id = str(uuid.uuid4())
                with Stopwatch() as sw:
                    await driver.clone(vm_id, gold)
                clones[name].append(sw.seconds)
                await driver.destroy(vm_id, None)
        copied: dict[str, list[float]] = {name: [] for name in SIZES}
        synced: dict[str, list[float]] = {name: [] for name in SIZES}
        for _ in range(copies):
            for name, gold in golds.items():
                copy, sync = full_copy(gold.disk.path, work / "copy.qcow2")
                copied[name].append(copy)
                synced[name].append(sync)
    print()
    for name in SIZES:
        print(describe(f"QemuDriver.clone, {name} gold", clones[name]))
    for name in SIZES:
        print(describe(f"cp --reflink=never, {name} gold", copied[name]))
    for name in SIZES:
        print(describe(f"cp + sync, {name} gold", synced[name]))
    small, big = (statistics.median(clones[name]) for name in SIZES)
    ratio = big / small
    print()
    print(
        f"clone 4 GB / clone 100 MB: {ratio:.2f}x   "
        f"target: the same within noise (< {NOISE}x): {verdict(max(ratio, 1 / ratio) < NOISE)}"
    )
    copy_small, copy_big = (statistics.median(synced[name]) for name in SIZES)
    print(
        f"cp+sync 4 GB / cp+sync 100 MB: {copy_big / copy_small:.1f}x;   "
        f"cp+sync / clone: {copy_small / small:.0f}x at 100 MB, {copy_big / big:.0f}x at 4 GB"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="clones of each gold image")
    parser.add_argument("--copies", type=int, default=3, help="full copies of each gold image")
    args = parser.parse_args()
    start("clone: linked clone of a 100 MB and a 4 GB gold image, against a full copy")
    asyncio.run(main(args.runs, args.copies))
