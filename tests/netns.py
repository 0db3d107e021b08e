"""Test helpers for real networking inside a private network namespace.

A ``FakeGuest`` stands in for a VM on a tap: busybox ``udhcpc`` runs in a namespace of its own,
on one end of a veth pair, and a small relay copies frames between the other end and the tap,
as QEMU would between the tap and the guest's NIC. A ``DhcpServer`` plays a DHCP server that
already exists on a host bridge, from a namespace of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

from goldclone.host.commands import run

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


def foreign_network() -> str:
    """What makes this network namespace look like the host's; empty if it is private."""
    with contextlib.suppress(OSError):  # unreadable without ptrace rights over PID 1
        if os.readlink("/proc/self/ns/net") == os.readlink("/proc/1/ns/net"):
            return "the network namespace of PID 1"

    def ip(*args: str) -> list[dict[str, Any]]:
        out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True)
        return cast(list[dict[str, Any]], json.loads(out.stdout or "[]"))

    names = [link["ifname"] for link in ip("link", "show")]
    foreign = [name for name in names if name != "lo" and not name.startswith("gc")]
    if foreign:
        return f"the interfaces {foreign}"
    if ip("route", "show", "default"):
        return "a default route"
    return ""


def _token() -> str:
    return secrets.token_hex(3)


async def ip_json(*args: str) -> list[dict[str, Any]]:
    """Run ``ip -j ARGS`` and return its parsed output."""
    _, out, _ = await run("ip", "-j", *args, timeout=10)
    data: list[dict[str, Any]] = json.loads(out) if out.strip() else []
    return data


def dnsmasq_pids(marker: str) -> list[int]:
    """Return the PIDs of live dnsmasq processes whose command line mentions ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args[0].endswith(b"dnsmasq") and any(marker.encode() in a for a in args):
            pids.append(int(entry.name))
    return pids


def alive(pid: int) -> bool:
    """Return whether ``pid`` runs and is not a zombie."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


async def stop_pid(pid: int) -> None:
    """SIGTERM ``pid`` and wait up to 5 s for it to die, then SIGKILL it."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        if not alive(pid):
            return
        await asyncio.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@contextlib.asynccontextmanager
async def namespace() -> AsyncIterator[str]:
    """Create a uniquely named network namespace and delete it afterwards."""
    name = f"gctest-{os.getpid()}-{_token()}"
    await run("ip", "netns", "add", name, timeout=10)
    try:
        await run("ip", "-n", name, "link", "set", "lo", "up", timeout=10)
        yield name
    finally:
        await run("ip", "netns", "del", name, timeout=10)


@contextlib.asynccontextmanager
async def veth_into(ns: str, *, mac: str | None = None) -> AsyncIterator[tuple[str, str]]:
    """Create a veth pair with one end, up, inside ``ns``; yield (outer, inner) names."""
    token = _token()
    outer, inner = f"gcvo{token}", f"gcvi{token}"
    await run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner, timeout=10)
    try:
        await run("ip", "link", "set", inner, "netns", ns, timeout=10)
        if mac is not None:
            await run("ip", "-n", ns, "link", "set", inner, "address", mac, timeout=10)
        await run("ip", "-n", ns, "link", "set", inner, "up", timeout=10)
        await run("ip", "link", "set", outer, "up", timeout=10)
        yield outer, inner
    finally:
        await run("ip", "link", "del", outer, timeout=10, check=False)


class _Relay:
    """Copies Ethernet frames between a tap (opened like QEMU opens it) and a link."""

    def __init__(self, tap: str, link: str) -> None:
        self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(self.fd, TUNSETIFF, struct.pack("16sH22x", tap.encode(), IFF_TAP | IFF_NO_PI))
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((link, ETH_P_ALL))
        self.sock.setblocking(False)
        loop = asyncio.get_running_loop()
        loop.add_reader(self.fd, self._from_tap)
        loop.add_reader(self.sock.fileno(), self._from_link)

    def _from_tap(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self.sock.send(os.read(self.fd, 65536))

    def _from_link(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            frame, address = self.sock.recvfrom(65536)
            if address[2] != PACKET_OUTGOING:
                os.write(self.fd, frame)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.fd)
        loop.remove_reader(self.sock.fileno())
        self.sock.close()
        os.close(self.fd)


class FakeGuest:
    """A DHCP client behind tap ``tap`` with MAC ``mac``, in namespace ``ns`` on link ``link``."""

    def __init__(self, ns: str, link: str, mac: str) -> None:
        self.ns = ns
        self.link = link
        self.mac = mac

    async def dhcp(self, script: Path) -> None:
        """Get one lease with busybox udhcpc; ``script`` handles its events."""
        await run(
            "ip", "netns", "exec", self.ns,
            "busybox", "udhcpc", "-i", self.link, "-f", "-q", "-n", "-t", "5", "-T", "1",
            "-s", str(script),
            timeout=30,
        )  # fmt: skip

    async def exec(self, *argv: str) -> str:
        """Run ``argv`` inside the guest's namespace and return its output."""
        _, out, _ = await run("ip", "netns", "exec", self.ns, *argv, timeout=30)
        return out


@contextlib.asynccontextmanager
async def fake_guest(tap: str, mac: str) -> AsyncIterator[FakeGuest]:
    """Plug a fake guest with MAC ``mac`` into ``tap``."""
    async with namespace() as ns, veth_into(ns, mac=mac) as (outer, inner):
        # The outer end lives in this namespace, the host's: without this table the host
        # would take the guest's packets from it directly, around the bridge and its rules.
        # The relay's packet socket still sees them: it comes before the ingress hook.
        table = f"gctest_{outer}"
        chain = f"type filter hook ingress device {outer} priority 0; policy drop;"
        script = f"table netdev {table} {{\n chain ingress {{\n {chain}\n }}\n}}\n"
        await run("nft", "-f", "-", stdin=script.encode(), timeout=10)
        # The relay copies frames as they are, so the guest must fill in its checksums
        # itself: with offloading its TCP segments would reach the host without them.
        await run("ip", "netns", "exec", ns, "ethtool", "-K", inner, "tx", "off", timeout=10)
        relay = _Relay(tap, outer)
        try:
            yield FakeGuest(ns, inner, mac)
        finally:
            relay.close()
            await run("nft", "delete", "table", "netdev", table, timeout=10, check=False)


class DhcpServer:
    """A dnsmasq on ``link`` inside namespace ``ns``, with its files in ``directory``."""

    def __init__(self, ns: str, link: str, directory: Path) -> None:
        self.ns = ns
        self.link = link
        self.lease_file = directory / "leases"
        self.pid_file = directory / "dnsmasq.pid"
        self.pid: int | None = None

    async def start(self, first: str, last: str) -> None:
        """Start serving ``first``..``last`` (a /24) and remember the PID."""
        await run(
            "ip", "netns", "exec", self.ns, "dnsmasq",
            "--conf-file=/dev/null", "--port=0", "--bind-interfaces", f"--interface={self.link}",
            f"--dhcp-range={first},{last},255.255.255.0,1h", f"--dhcp-leasefile={self.lease_file}",
            "--dhcp-authoritative", "--no-ping", f"--pid-file={self.pid_file}",
            timeout=10,
        )  # fmt: skip
        self.pid = int(self.pid_file.read_text())

    async def stop(self) -> None:
        """Stop the server by its PID."""
        if self.pid is not None:
            await stop_pid(self.pid)
            self.pid = None


@contextlib.asynccontextmanager
async def http_server(directory: Path, address: str, ns: str | None = None) -> AsyncIterator[int]:
    """busybox httpd serving ``directory`` on ``address`` (``IP:PORT``), in namespace ``ns`` or
    this one, until the block ends; yields its PID. It answers once the port is bound."""
    argv = ["busybox", "httpd", "-f", "-p", address, "-h", str(directory)]
    if ns is not None:
        argv = ["ip", "netns", "exec", ns, *argv]
    process = await asyncio.create_subprocess_exec(*argv)
    try:
        host, port = address.rsplit(":", 1)
        host = "127.0.0.1" if host == "0.0.0.0" else host
        for _ in range(50):  # it binds within milliseconds; each try waits up to 0.2 s
            if await reaches(ns, host, int(port), timeout=0.2):
                break
        else:
            raise RuntimeError(f"busybox httpd on {address} does not answer")
        yield process.pid
    finally:
        await stop_pid(process.pid)
        await process.wait()


UPSTREAM = {
    "link": "192.0.2.2",  # TEST-NET-1, the host's neighbour
    "lan": "10.66.0.2",  # a machine in a private range behind the host
    "metadata": "169.254.169.254",  # a cloud's instance metadata service
    "internet": "198.51.100.7",  # TEST-NET-2, which stands in for a public address
}


@contextlib.asynccontextmanager
async def upstream(directory: Path) -> AsyncIterator[str]:
    """A namespace behind a veth that holds every address of ``UPSTREAM``, each serving
    ``directory`` over HTTP on port 80, with routes to them from this namespace; this end is
    192.0.2.1. Yields the namespace."""
    async with namespace() as ns, veth_into(ns) as (outer, inner):
        await run("ip", "addr", "add", "192.0.2.1/24", "dev", outer, timeout=10)
        await run("ip", "-n", ns, "addr", "add", "192.0.2.2/24", "dev", inner, timeout=10)
        for name, address in UPSTREAM.items():
            if name != "link":
                await run("ip", "-n", ns, "addr", "add", f"{address}/32", "dev", "lo", timeout=10)
                await run("ip", "route", "add", f"{address}/32", "via", "192.0.2.2", timeout=10)
        async with http_server(directory, "0.0.0.0:80", ns):
            yield ns


_CONNECT = (
    "import socket, sys; "
    "socket.create_connection((sys.argv[1], int(sys.argv[2])), float(sys.argv[3]))"
)


async def reaches(ns: str | None, address: str, port: int, timeout: float = 3.0) -> bool:
    """Whether a TCP connection from namespace ``ns`` (``None``: this one) to
    ``address:port`` is accepted within ``timeout`` seconds; refused, dropped and timed out
    alike are ``False``."""
    argv = [sys.executable, "-c", _CONNECT, address, str(port), str(timeout)]
    if ns is not None:
        argv = ["ip", "netns", "exec", ns, *argv]
    code, _, _ = await run(*argv, timeout=timeout + 30, check=False)
    return code == 0
