"""(o) What the walls cost (issue #26): a pool claim and a template start with the network rules
and without them, the time to put one VM's rules in place and take them away, and TCP
throughput between two peers of one group with and without the rules.

* Starts: two servers at once, each with bridges and a subnet of its own: this code, and the
  code of ``--baseline`` (the commit before the rules), run from a git worktree of it. The
  demo guest (1 vCPU, 256 MB) is claimed from a pool of one and restored from a template on
  each, the two servers taking turns; POST -> running (``?wait=true``).
* Rules: ``firewall.guard`` and ``firewall.unguard`` of one guest on a network of 50, each one
  ``nft -f`` transaction, timed in this process.
* Throughput: two namespaces on veths named as two VMs' taps, on a walled bridge (no QEMU:
  under TCG the guests' own speed would hide the rules), one TCP stream of ``--megabytes``
  from one to the other; the rules are taken away and put back between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from bench._common import Server, demo_server, describe, ms, scratch, span, start, wait_running
from bench.template import fill_pool, make_template
from goldclone.drivers.qemu.network import Networks, firewall
from goldclone.egress import Reach
from goldclone.host.commands import run
from goldclone.settings import NetworkConfig
from tests.netns import namespace

BASELINE = "d026b8d"
"""The last commit before the rules (main at the start of issue #26's work)."""
TARGET = 1.10
SINK = ("import socket; s = socket.create_server(('0.0.0.0', 5001)); print('ready', flush=True)\n"
        "c, _ = s.accept()\nwhile c.recv(1 << 20): pass\n")  # fmt: skip
SOURCE = ("import socket, sys, time; c = socket.create_connection((sys.argv[1], 5001)); "
          "block = bytes(1 << 20); t = time.perf_counter()\n"
          "for _ in range(int(sys.argv[2])): c.sendall(block)\n"
          "c.close(); print(time.perf_counter() - t)")  # fmt: skip


@contextmanager
def worktree(revision: str, work: Path) -> Iterator[Path]:
    """The source of ``revision``, checked out beside this one."""
    folder = work / "baseline"
    repo = Path(__file__).resolve().parents[1]
    subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", "-q", str(folder),
                    revision], check=True)  # fmt: skip
    try:
        yield folder / "src"
    finally:
        subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(folder)],
                       check=True)  # fmt: skip


def networks_env(n: int) -> dict[str, str]:
    """Bridges and subnets of their own for the ``n``th server."""
    return {"GOLDCLONE_NAT_BRIDGE": f"gcbnat{n}", "GOLDCLONE_NAT_SUBNET": f"10.231.{2 * n}.0/24",
            "GOLDCLONE_HOSTONLY_BRIDGE": f"gcbhost{n}",
            "GOLDCLONE_HOSTONLY_SUBNET": f"10.231.{2 * n + 1}.0/24"}  # fmt: skip


def network_config(n: int) -> NetworkConfig:
    env = networks_env(n)
    return NetworkConfig(nat_bridge=env["GOLDCLONE_NAT_BRIDGE"],
                         nat_subnet=IPv4Network(env["GOLDCLONE_NAT_SUBNET"]),
                         hostonly_bridge=env["GOLDCLONE_HOSTONLY_BRIDGE"],
                         hostonly_subnet=IPv4Network(env["GOLDCLONE_HOSTONLY_SUBNET"]))  # fmt: skip


async def claim_and_restore(server: Server, body: dict[str, Any]) -> dict[str, float]:
    """POST -> running for a VM claimed from a full pool of one, then for one restored from
    the template (no pool)."""
    times = {}
    for kind in ("pool", "template"):
        if kind == "pool":
            await fill_pool(server, body)
        else:
            await server.client.delete("/pools/bench")
        started = time.perf_counter()
        vm = await wait_running(server, (await server.post_vm(body))["id"])
        times[kind] = time.perf_counter() - started
        assert vm["started_from"] == kind, vm["started_from"]
        assert span(vm, "accepted", "running") <= times[kind]
        await server.delete(vm["id"])
    return times


async def starts(runs: int, baseline: str) -> None:
    print("-- pool claim and template start, POST -> running")
    results: dict[str, dict[str, list[float]]] = {}
    with scratch() as work, worktree(baseline, work) as old_src:
        env_new = networks_env(1)
        path = f"{old_src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
        env_old = networks_env(2) | {"PYTHONPATH": path}
        (work / "new").mkdir()
        (work / "old").mkdir()
        async with (
            demo_server(work / "new", **env_new) as (new, new_body),
            demo_server(work / "old", **env_old) as (old, old_body),
        ):
            for server, body in ((new, new_body), (old, old_body)):
                await make_template(server, body)
            servers = {"with rules": (new, new_body), "without": (old, old_body)}
            results = {name: {"pool": [], "template": []} for name in servers}
            for round_ in range(runs):
                order = list(servers) if round_ % 2 == 0 else list(servers)[::-1]
                for name in order:
                    server, body = servers[name]
                    for kind, seconds in (await claim_and_restore(server, body)).items():
                        results[name][kind].append(seconds)
                        print(f"run {round_}: {name:<10} {kind:<8} {ms(seconds)}")
    print()
    for kind in ("pool", "template"):
        with_rules, without = (results[name][kind] for name in ("with rules", "without"))
        print(describe(f"{kind} with rules", with_rules))
        print(describe(f"{kind} without", without))
        ratio = statistics.median(with_rules) / statistics.median(without)
        print(f"{kind}: with / without {ratio:.3f} (medians); target < {TARGET}: "
              f"{'MET' if ratio < TARGET else 'MISSED'}\n")  # fmt: skip


async def rule_changes(count: int) -> None:
    print("-- one VM's rules: put in place, and taken away (one nft -f each)")
    with scratch() as work:
        networks = Networks(network_config(3), work / "networks")
        try:
            attached = [await networks.attach("nat", f"vm-{i}", Reach(group="g"))
                        for i in range(count)]  # fmt: skip
            wall = networks.walls.wall("nat")
            guards = [firewall.Guard(a.tap, a.mac, IPv4Address(a.ip), "g") for a in attached]
            puts, takes = [], []
            for guard in guards:
                others = [g for g in guards if g is not guard]
                started = time.perf_counter()
                await firewall.unguard(wall, guard, others)
                takes.append(time.perf_counter() - started)
                started = time.perf_counter()
                await firewall.guard(wall, guard, others)
                puts.append(time.perf_counter() - started)
            print(describe(f"put in place, one of {count} in one group", puts))
            print(describe(f"taken away, one of {count} in one group", takes))
        finally:
            await networks.teardown()
    print()


async def throughput(runs: int, megabytes: int) -> None:
    print(f"-- TCP throughput between two peers of one group, {megabytes} MB a run")
    config = network_config(4)
    rates: dict[str, list[float]] = {"with rules": [], "without": []}
    with scratch() as work:
        networks = Networks(config, work / "networks")
        try:
            a, b = [await networks.attach("nat", f"vm-{n}", Reach(group="g")) for n in "ab"]
            async with namespace() as ns_a, namespace() as ns_b:
                for attachment, ns in ((a, ns_a), (b, ns_b)):
                    await run("ip", "link", "del", attachment.tap, timeout=10)  # its name, a veth
                    await run("ip", "link", "add", attachment.tap, "type", "veth", "peer", "name",
                              "eth0", "netns", ns, timeout=10)  # fmt: skip
                    await run("ip", "link", "set", attachment.tap, "master", config.nat_bridge,
                              "up", timeout=10)  # fmt: skip
                    await run("ip", "-n", ns, "link", "set", "eth0", "address", attachment.mac,
                              "up", timeout=10)  # fmt: skip
                    await run("ip", "-n", ns, "addr", "add", f"{attachment.ip}/24", "dev",
                              "eth0", timeout=10)  # fmt: skip
                for round_ in range(runs):
                    names = ["with rules", "without"]
                    for name in names if round_ % 2 == 0 else names[::-1]:
                        if name == "without":
                            await firewall.remove(networks.walls.wall("nat"))
                        else:
                            await networks.walls.rewrite("nat")
                        sink = await asyncio.create_subprocess_exec(
                            "ip", "netns", "exec", ns_b, sys.executable, "-c", SINK,
                            stdout=asyncio.subprocess.PIPE)  # fmt: skip
                        try:
                            assert sink.stdout is not None
                            await sink.stdout.readline()  # it listens
                            source = [sys.executable, "-c", SOURCE, b.ip, str(megabytes)]
                            _, out, _ = await run("ip", "netns", "exec", ns_a, *source,
                                                  timeout=300)  # fmt: skip
                        finally:
                            if sink.returncode is None:
                                sink.kill()
                            await sink.wait()
                        rates[name].append(megabytes / float(out))
                        print(f"run {round_}: {name:<10} {megabytes / float(out):8.0f} MB/s")
        finally:
            await networks.teardown()
    for name, values in rates.items():
        print(f"{name:<10}: median {statistics.median(values):.0f} MB/s")
    ratio = statistics.median(rates["with rules"]) / statistics.median(rates["without"])
    print(f"with / without: {ratio:.3f}\n")


async def main(args: argparse.Namespace) -> None:
    if "rules" in args.parts:
        await rule_changes(args.vms)
    if "throughput" in args.parts:
        await throughput(args.runs, args.megabytes)
    if "starts" in args.parts:
        await starts(args.runs, args.baseline)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6, help="rounds of each measure")
    parser.add_argument("--vms", type=int, default=50, help="VMs on the network of the rules")
    parser.add_argument("--megabytes", type=int, default=1000, help="per throughput run")
    parser.add_argument("--baseline", default=BASELINE, help="the commit without the rules")
    parser.add_argument("--parts", nargs="+", default=["rules", "throughput", "starts"],
                        choices=["rules", "throughput", "starts"])  # fmt: skip
    start("walls: what the network rules cost")
    asyncio.run(main(parser.parse_args()))
