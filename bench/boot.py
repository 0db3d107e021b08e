"""(a) Boot: POST /vms to a running VM with its IP, on a cached image, against a raw QEMU cold
boot of the same guest to its DHCP lease.

The raw boot is a qcow2 linked clone of the same gold disk, with the same -smp, -m and virtio
NIC, on a tap on a bridge of its own served by dnsmasq --no-ping. Its clone and tap are made
before the clock starts; it is timed from launching qemu to its MAC appearing in the lease file
(polled every 10 ms). The service is timed from sending POST to the first GET (every 20 ms) that
shows "running", and by its timeline's accepted -> running span, which excludes the polling.
The two alternate, one VM at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench._common import (
    POLL,
    QEMU,
    Server,
    demo_server,
    describe,
    ms,
    phase_at,
    scratch,
    span,
    start,
    verdict,
    wait_running,
)
from goldclone.drivers.qemu.accel import choose_accel
from goldclone.drivers.qemu.network import dnsmasq_leases
from goldclone.guest.config import GuestConfig
from goldclone.guest.nocloud import write_seed
from goldclone.images.cache import ImageCache
from goldclone.models import ImageSpec

BRIDGE, TAP = "bbraw0", "bbtap0"
SUBNET = "10.201.0"
TARGET_MS, TARGET_PCT = 500.0, 15.0
RAW_TIMEOUT = 900.0
PHASES = ("accepted->cloning", "cloning->booting", "booting->running")
LAGS = ("post->accepted", "running->seen")


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


class RawBoot:
    """Cold boots of plain qemu on a bridge with its own dnsmasq, not through goldclone; with
    ``guest``, each boot has the NoCloud seed that goldclone would give it."""

    def __init__(
        self, work: Path, gold: Path, cpus: int, memory: int, accel: str,
        guest: GuestConfig | None = None,
    ) -> None:  # fmt: skip
        self.work, self.gold = work, gold
        self.cpus, self.memory, self.accel = cpus, memory, accel
        self.guest = guest
        self.lease_file = work / "leases"

    @contextmanager
    def network(self) -> Iterator[None]:
        self.work.mkdir()
        sh("ip", "link", "add", BRIDGE, "type", "bridge", "forward_delay", "0", "stp_state", "0")
        dnsmasq: subprocess.Popen[bytes] | None = None
        try:
            sh("ip", "addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
            sh("ip", "link", "set", BRIDGE, "up")
            dnsmasq = subprocess.Popen(
                ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
                 "--bind-interfaces", f"--interface={BRIDGE}", "--except-interface=lo",
                 f"--dhcp-range={SUBNET}.10,{SUBNET}.250,12h",
                 f"--dhcp-leasefile={self.lease_file}", "--dhcp-authoritative", "--no-ping"]
            )  # fmt: skip
            time.sleep(0.3)
            if dnsmasq.poll() is not None:
                raise RuntimeError("dnsmasq exited at start")
            yield
        finally:
            if dnsmasq is not None:
                stop(dnsmasq)
            subprocess.run(["ip", "link", "del", BRIDGE], check=False)

    def boot(self, run: int, port: int | None = None) -> tuple[float, float | None]:
        """Seconds from launching qemu to the guest's lease, and (with ``port``) to that port
        accepting a connection; the guest is gone afterwards."""
        mac = "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))
        clone, console = self.work / f"clone{run}.qcow2", self.work / f"console{run}.log"
        seed = self.work / f"seed{run}.iso"
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(self.gold), "-F", "qcow2",
           str(clone))  # fmt: skip
        seeded: list[str] = []
        if self.guest is not None:
            write_seed(seed, self.guest, mac)
            seeded = ["-drive", f"file={seed},format=raw,if=virtio,readonly=on"]
        sh("ip", "tuntap", "add", "dev", TAP, "mode", "tap")
        try:
            sh("ip", "link", "set", TAP, "master", BRIDGE, "up")
            started = time.perf_counter()
            qemu = subprocess.Popen(
                [QEMU, "-name", f"bench-raw-{run}", "-accel", self.accel,
                 "-smp", str(self.cpus), "-m", str(self.memory),
                 "-drive", f"file={clone},format=qcow2,if=virtio", *seeded,
                 "-netdev", f"tap,id=net0,ifname={TAP},script=no,downscript=no",
                 "-device", f"virtio-net-pci,netdev=net0,mac={mac}",
                 "-display", "none", "-serial", f"file:{console}"]
            )  # fmt: skip
            try:
                while (ip := dnsmasq_leases.lookup(self.lease_file, mac)) is None:
                    if qemu.poll() is not None or time.perf_counter() - started > RAW_TIMEOUT:
                        raise RuntimeError(f"raw qemu got no lease; see {console}")
                    time.sleep(POLL / 2)
                leased = time.perf_counter() - started
                if port is None:
                    return leased, None
                while not _accepts(ip, port):
                    if qemu.poll() is not None or time.perf_counter() - started > RAW_TIMEOUT:
                        raise RuntimeError(f"raw qemu's port {port} never opened; see {console}")
                    time.sleep(POLL)
                return leased, time.perf_counter() - started
            finally:
                stop(qemu)
        finally:
            subprocess.run(["ip", "link", "del", TAP], check=False)
            for path in (clone, console, seed):
                path.unlink(missing_ok=True)


def _accepts(ip: str, port: int) -> bool:
    try:
        socket.create_connection((ip, port), timeout=1).close()
    except OSError:
        return False
    return True


async def service_boot(server: Server, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """Seconds from sending POST to the first GET that shows running, and the VM then.

    The VM gets two more wall-clock spans (host clock, ms): ``post->accepted``, from sending
    POST to the timeline's accepted stamp, and ``running->seen``, from the running stamp to
    the GET that showed it.
    """
    sent_at = datetime.now(UTC)
    started = time.perf_counter()
    vm = await wait_running(server, (await server.post_vm(body))["id"])
    elapsed = time.perf_counter() - started
    seen_at = datetime.now(UTC)
    await server.delete(vm["id"])
    vm["post->accepted"] = (phase_at(vm, "accepted") - sent_at).total_seconds()
    vm["running->seen"] = (seen_at - phase_at(vm, "running")).total_seconds()
    return elapsed, vm


def added(label: str, service: list[float], raw: list[float]) -> bool:
    extra = statistics.median(service) - statistics.median(raw)
    pct = 100 * extra / statistics.median(raw)
    met = extra * 1000 < TARGET_MS and pct < TARGET_PCT
    print(f"added by the service ({label}): {ms(extra)} = {pct:+.1f} %   "
          f"target < {TARGET_MS:.0f} ms and < {TARGET_PCT:.0f} %: {verdict(met)}")  # fmt: skip
    return met


async def main(runs: int) -> None:
    with scratch() as work:
        async with demo_server(work) as (server, body):
            image = ImageSpec.model_validate(body["image"])
            gold = ImageCache(server.data_dir, server.client).cached(image)
            assert gold is not None and gold.disk.format == "qcow2"
            accel = await choose_accel("auto", QEMU)
            raw = RawBoot(work / "raw", gold.disk.path, body["cpus"], body["memory"], accel)
            with raw.network():
                # a warm-up boot; the service's was the VM that warmed the cache
                await asyncio.to_thread(raw.boot, -1)
                by_get: list[float] = []
                timeline: list[float] = []
                phases: dict[str, list[float]] = {name: [] for name in PHASES}
                lags: dict[str, list[float]] = {name: [] for name in LAGS}
                bare: list[float] = []
                for run in range(runs):
                    for side in ("service", "raw") if run % 2 == 0 else ("raw", "service"):
                        if side == "raw":
                            bare.append((await asyncio.to_thread(raw.boot, run))[0])
                            print(f"run {run}: raw qemu launch -> lease      {ms(bare[-1])}")
                            continue
                        elapsed, vm = await service_boot(server, body)
                        by_get.append(elapsed)
                        timeline.append(span(vm, "accepted", "running"))
                        for name, values in phases.items():
                            values.append(span(vm, *name.split("->")))
                        for name, values in lags.items():
                            values.append(vm[name])
                        print(f"run {run}: service POST -> GET running  {ms(elapsed)}   "
                              f"timeline accepted -> running {ms(timeline[-1])}")  # fmt: skip
    print()
    print(describe("raw qemu launch -> lease", bare))
    print(describe("service POST -> GET running", by_get))
    print(describe("service accepted -> running", timeline))
    for name, values in phases.items():
        print(describe(f"  timeline {name}", values))
    for name, values in lags.items():
        print(describe(f"  wall clock {name}", values))
    print()
    added("POST -> GET running", by_get, bare)
    added("timeline accepted -> running", timeline, bare)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed boots of each kind")
    args = parser.parse_args()
    start("boot: POST /vms -> running, against a raw qemu cold boot -> DHCP lease")
    asyncio.run(main(args.runs))
