"""The walls around a guest, tried as an attacker would, beside the paths that must still work.

Each guest is a ``FakeGuest``: a namespace whose frames go through a real tap on a real bridge,
as a VM's would, so every rule sees what it would see from QEMU. Behind the host, an
``upstream`` namespace plays a private LAN, a cloud's metadata service and the internet. Tests
with real QEMU guests are in ``test_walls_guests.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from ipaddress import IPv4Network
from pathlib import Path

import httpx
import pytest

from goldclone.doctor import Verdict, check_host
from goldclone.drivers.qemu.network import Attachment, Networks, firewall
from goldclone.egress import DEFAULT_REACH, Reach, destination
from goldclone.host.commands import run
from goldclone.polling import until
from goldclone.settings import NetworkConfig, Settings
from tests.netns import (
    UPSTREAM,
    DhcpServer,
    FakeGuest,
    fake_guest,
    http_server,
    namespace,
    reaches,
    upstream,
    veth_into,
)

pytestmark = pytest.mark.root

NAT = IPv4Network("172.31.125.0/24")
HOSTONLY = IPv4Network("172.31.126.0/24")
HOST = "172.31.125.1"
CONFIG = NetworkConfig(nat_bridge="gctwnat0", nat_subnet=NAT, hostonly_bridge="gctwhost0",
                       hostonly_subnet=HOSTONLY, guest_host_ports=(3142,))  # fmt: skip
ALLOWED_PORT, CLOSED_PORT = 3142, 8765
BRIDGE_NF = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
DHCP_SCRIPT = """#!/bin/sh
[ "$1" = bound ] || exit 0
ip addr add "$ip/$mask" dev "$interface"
[ -n "$router" ] && ip route add default via "$router"
exit 0
"""


@pytest.fixture(params=["0", "1"], ids=["bridge-nf-off", "bridge-nf-on"])
def bridge_nf(request: pytest.FixtureRequest) -> Iterator[None]:
    """Whether bridged IPv4 also passes the ``ip`` hooks: off on most hosts, on on this one."""
    before = BRIDGE_NF.read_text()
    BRIDGE_NF.write_text(request.param)
    yield
    BRIDGE_NF.write_text(before)


@pytest.fixture
def served(tmp_path: Path) -> Path:
    folder = tmp_path / "served"
    folder.mkdir()
    (folder / "index.html").write_text("served\n")
    return folder


@pytest.fixture
async def world(served: Path) -> AsyncIterator[str]:
    """The upstream namespace, and two services of the host on all its addresses: one on a
    port guests may reach (``guest_host_ports``), one on a port they may not."""
    async with (
        upstream(served) as ns,
        http_server(served, f"0.0.0.0:{ALLOWED_PORT}"),
        http_server(served, f"0.0.0.0:{CLOSED_PORT}"),
    ):
        yield ns


@pytest.fixture
def dhcp_script(tmp_path: Path) -> Path:
    path = tmp_path / "udhcpc.sh"
    path.write_text(DHCP_SCRIPT)
    path.chmod(0o755)
    return path


@pytest.fixture
async def networks(tmp_path: Path) -> AsyncIterator[Networks]:
    nets = Networks(CONFIG, tmp_path / "networks")
    yield nets
    await nets.teardown()


class Guests:
    """Fake guests on ``networks``, each with its lease and a web server on port 80."""

    def __init__(self, networks: Networks, script: Path, served: Path) -> None:
        self.networks = networks
        self.script = script
        self.served = served
        self.stack = contextlib.AsyncExitStack()

    async def add(
        self, name: str, reach: Reach = DEFAULT_REACH, network_type: str = "nat"
    ) -> tuple[Attachment, FakeGuest]:
        attachment = await self.networks.attach(network_type, name, reach)
        guest = await self.stack.enter_async_context(fake_guest(attachment.tap, attachment.mac))
        await guest.dhcp(self.script)
        assert await self.networks.wait_for_ip(attachment, timeout=10) == attachment.ip
        page = self.served / name
        page.mkdir()
        (page / "index.html").write_text(f"{name}\n")
        await self.stack.enter_async_context(http_server(page, "0.0.0.0:80", guest.ns))
        return attachment, guest


@pytest.fixture
async def guests(networks: Networks, dhcp_script: Path, served: Path) -> AsyncIterator[Guests]:
    made = Guests(networks, dhcp_script, served)
    async with made.stack:
        yield made


async def page(ip: str) -> str:
    """What the guest at ``ip`` serves on port 80, fetched by the host."""
    async with httpx.AsyncClient(timeout=10) as client:
        return (await client.get(f"http://{ip}/")).text


async def probe_all(ns: str, targets: dict[str, tuple[str, int]]) -> dict[str, bool]:
    """Whether ``ns`` reaches each target, tried at once."""
    results = await asyncio.gather(*(reaches(ns, ip, port) for ip, port in targets.values()))
    return dict(zip(targets, results, strict=True))


async def test_a_guest_reaches_the_internet_and_nothing_else_of_its_host_peers_or_lan(
    bridge_nf: None, world: str, guests: Guests
) -> None:
    a, attacker = await guests.add("vm-a")
    b, _ = await guests.add("vm-b")

    reached = await probe_all(attacker.ns, {
        "a peer's web server": (b.ip, 80),
        "a host service on all addresses, on the bridge's address": (HOST, CLOSED_PORT),
        "the same service on the host's other address": ("192.0.2.1", CLOSED_PORT),
        "a machine in a private range behind the host": (UPSTREAM["lan"], 80),
        "the cloud metadata service": (UPSTREAM["metadata"], 80),
        "a host port the operator allows": (HOST, ALLOWED_PORT),
        "DNS on the bridge's address": (HOST, 53),
        "a public address beyond the host": (UPSTREAM["internet"], 80),
    })  # fmt: skip

    assert reached == {
        "a peer's web server": False,
        "a host service on all addresses, on the bridge's address": False,
        "the same service on the host's other address": False,
        "a machine in a private range behind the host": False,
        "the cloud metadata service": False,
        "a host port the operator allows": True,
        "DNS on the bridge's address": True,
        "a public address beyond the host": True,
    }
    assert await reaches(None, b.ip, 80)  # the host opens connections to its guests
    assert await reaches(None, a.ip, 80)


async def test_a_group_reaches_its_members_and_nobody_else(
    bridge_nf: None, world: str, guests: Guests
) -> None:
    a, in_a = await guests.add("vm-a", Reach(group="build-17"))
    b, in_b = await guests.add("vm-b", Reach(group="build-17"))
    c, in_c = await guests.add("vm-c", Reach(group="build-18"))
    d, _ = await guests.add("vm-d")

    assert await reaches(in_a.ns, b.ip, 80) and await reaches(in_b.ns, a.ip, 80)
    assert await probe_all(in_c.ns, {"a": (a.ip, 80), "d": (d.ip, 80)}) == {"a": False, "d": False}
    assert await probe_all(in_a.ns, {"c": (c.ip, 80), "d": (d.ip, 80)}) == {"c": False, "d": False}
    assert (await drops_in(guests.networks, c))["peer"] > 0


async def test_a_claim_moves_a_running_guest_into_a_group(world: str, guests: Guests) -> None:
    a, in_a = await guests.add("vm-a")
    b, _ = await guests.add("vm-b", Reach(group="job-3"))
    assert not await reaches(in_a.ns, b.ip, 80)

    changed = await guests.networks.set_reach(a, Reach(group="job-3"))

    assert changed.reach == Reach(group="job-3")
    # the guest asks again for the peer's MAC, which it failed to learn before
    assert await until(lambda: reaches(in_a.ns, b.ip, 80), interval=0.1, timeout=30)
    await guests.networks.set_reach(changed, DEFAULT_REACH)
    assert not await reaches(in_a.ns, b.ip, 80)


async def test_a_guest_cannot_take_over_a_peers_address(world: str, guests: Guests) -> None:
    victim, _ = await guests.add("vm-victim", Reach(group="g"))
    thief, in_thief = await guests.add("vm-thief", Reach(group="g"))
    assert await page(victim.ip) == "vm-victim\n"

    await in_thief.exec("ip", "addr", "add", f"{victim.ip}/32", "dev", in_thief.link)
    await in_thief.exec("busybox", "arping", "-U", "-c", "3", "-w", "1", "-I", in_thief.link,
                        "-s", victim.ip, victim.ip)  # fmt: skip
    [entry] = json.loads((await run("ip", "-j", "neigh", "show", victim.ip, timeout=10))[1])
    assert entry["lladdr"] == victim.mac
    await run("ip", "neigh", "flush", "dev", CONFIG.nat_bridge, timeout=10)
    # the host asks again, and the thief's kernel, which now holds the address, answers too
    assert await page(victim.ip) == "vm-victim\n"
    [entry] = json.loads((await run("ip", "-j", "neigh", "show", victim.ip, timeout=10))[1])
    assert entry["lladdr"] == victim.mac
    assert (await drops_in(guests.networks, thief))["arp"] >= 3


async def test_a_guest_with_another_mac_or_source_address_is_cut_off(
    world: str, guests: Guests
) -> None:
    a, in_a = await guests.add("vm-a")
    b, _ = await guests.add("vm-b")
    assert await reaches(in_a.ns, HOST, ALLOWED_PORT)

    await in_a.exec("ip", "addr", "add", f"{b.ip}/32", "dev", in_a.link)
    await in_a.exec("ip", "route", "add", f"{HOST}/32", "dev", in_a.link, "src", b.ip)
    assert not await reaches(in_a.ns, HOST, ALLOWED_PORT)  # from the peer's address
    assert (await drops_in(guests.networks, a))["ip"] > 0
    await in_a.exec("ip", "route", "del", f"{HOST}/32")

    await in_a.exec("ip", "link", "set", "dev", in_a.link, "address", "52:54:00:66:66:66")
    assert not await reaches(in_a.ns, HOST, ALLOWED_PORT)  # from another MAC
    assert (await drops_in(guests.networks, a))["mac"] > 0


def _router_advertisement(mac: str) -> bytes:
    """An Ethernet frame holding an IPv6 router advertisement from ``mac``'s link-local
    address to all nodes, with its checksum."""
    octets = bytes.fromhex(mac.replace(":", ""))
    eui = bytes([octets[0] ^ 2]) + octets[1:3] + b"\xff\xfe" + octets[3:]
    source, target = b"\xfe\x80" + bytes(6) + eui, b"\xff\x02" + bytes(13) + b"\x01"
    body = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0)  # lifetime 1800 s
    pseudo = source + target + struct.pack("!I3xB", len(body), 58) + body
    total = sum(struct.unpack(f"!{len(pseudo) // 2}H", pseudo))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    body = body[:2] + struct.pack("!H", ~total & 0xFFFF) + body[4:]
    ipv6 = struct.pack("!IHBB", 6 << 28, len(body), 58, 255) + source + target
    return bytes.fromhex("333300000001") + octets + b"\x86\xdd" + ipv6 + body


_SEND_FRAME = (
    "import socket, sys; s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); "
    "s.bind((sys.argv[1], 0)); [s.send(bytes.fromhex(sys.argv[2])) for _ in range(5)]"
)


async def test_no_rogue_dhcp_server_or_router_advertisement_reaches_a_peer(
    world: str, guests: Guests, tmp_path: Path
) -> None:
    rogue, in_rogue = await guests.add("vm-rogue", Reach(group="g"))
    victim, in_victim = await guests.add("vm-victim", Reach(group="g"))
    server = DhcpServer(in_rogue.ns, in_rogue.link, tmp_path)
    await server.start("172.31.125.251", "172.31.125.254")
    try:
        await in_victim.exec("ip", "addr", "flush", "dev", in_victim.link)
        await in_victim.dhcp(guests.script)  # the rogue hears it, as a group member
        [address] = json.loads(await in_victim.exec("ip", "-j", "-4", "addr", "show", "dev",
                                                     in_victim.link))[0]["addr_info"]  # fmt: skip
        assert address["local"] == victim.ip
        assert (await drops_in(guests.networks, rogue))["dhcp-server"] > 0
    finally:
        await server.stop()

    before = (await drops_in(guests.networks, rogue)).get("protocol", 0)
    frame = _router_advertisement(rogue.mac).hex()
    await in_rogue.exec(sys.executable, "-c", _SEND_FRAME, in_rogue.link, frame)

    async def all_dropped() -> bool:
        return (await drops_in(guests.networks, rogue))["protocol"] >= before + 5

    await until(all_dropped, interval=0.05, timeout=10)
    assert await in_victim.exec("ip", "-6", "route", "show", "default") == ""


async def test_hostonly_reaches_the_host_and_nothing_beyond(world: str, guests: Guests) -> None:
    _, guest = await guests.add("vm-h", network_type="hostonly")
    host = str(HOSTONLY.network_address + 1)

    assert await probe_all(guest.ns, {
        "allowed": (host, ALLOWED_PORT), "closed": (host, CLOSED_PORT),
        "internet": (UPSTREAM["internet"], 80), "lan": (UPSTREAM["lan"], 80),
    }) == {"allowed": True, "closed": False, "internet": False, "lan": False}  # fmt: skip


async def test_egress_follows_the_operator_and_narrows_per_vm(
    world: str, tmp_path: Path, dhcp_script: Path, served: Path
) -> None:
    lan_cache = destination(f"{UPSTREAM['lan']}:80")
    internet = destination("198.51.100.0/24")
    config = replace(CONFIG, egress_allow=(lan_cache,), egress_deny=(internet,))
    networks = Networks(config, tmp_path / "networks")
    made = Guests(networks, dhcp_script, served)
    try:
        async with made.stack:
            _, host_policy = await made.add("vm-1")
            _, only_lan = await made.add("vm-2", Reach(egress=(lan_cache,)))
            _, nothing = await made.add("vm-3", Reach(egress=()))
            targets = {
                "lan": (UPSTREAM["lan"], 80), "internet": (UPSTREAM["internet"], 80),
                "metadata": (UPSTREAM["metadata"], 80), "host": (HOST, ALLOWED_PORT),
            }  # fmt: skip

            assert await probe_all(host_policy.ns, targets) == {
                "lan": True, "internet": False, "metadata": False, "host": True}  # fmt: skip
            assert await probe_all(only_lan.ns, targets) == {
                "lan": True, "internet": False, "metadata": False, "host": True}  # fmt: skip
            assert await probe_all(nothing.ns, targets) == {
                "lan": False, "internet": False, "metadata": False, "host": True}  # fmt: skip
    finally:
        await networks.teardown()


async def test_rules_come_and_go_with_the_tap_and_are_mended_when_lost(
    world: str, guests: Guests, tmp_path: Path
) -> None:
    networks = guests.networks
    wall = networks.walls.wall("nat")
    a, in_a = await guests.add("vm-a")
    b, _ = await guests.add("vm-b")
    assert await firewall.guarded(wall) == {a.tap, b.tap}
    settings = Settings(data_dir=tmp_path, network=CONFIG)  # the networks' own data dir

    # rules lost behind the service's back: the check finds the tap bare, doctor says so,
    # and the repair writes every guest's rules again
    await run("nft", "delete", "element", "bridge", wall.table, "guarded", f'{{ "{a.tap}" }}',
              timeout=10)  # fmt: skip
    doctor = {f.name: f for f in await check_host(settings)}["walls"]
    assert doctor.verdict is Verdict.PROBLEM and a.tap in doctor.found, doctor
    assert "have no rules" in str((await networks.health())["network nat"])
    repair = await networks.heal("nat")
    assert repair is not None and repair.done == "wrote its rules again"
    assert await firewall.guarded(wall) == {a.tap, b.tap}
    assert {f.name: f for f in await check_host(settings)}["walls"].verdict is Verdict.OK
    assert not await reaches(in_a.ns, b.ip, 80)

    # a service that restarts adopts its guests with their rules, even if the tables are gone
    await networks.close()
    await run("nft", "delete", "table", "bridge", wall.table, timeout=10)
    restarted = Networks(CONFIG, tmp_path / "networks")
    for attachment in (a, b):
        await restarted.adopt(Attachment.from_record(attachment.machine, attachment.record()))
    assert await firewall.guarded(wall) == {a.tap, b.tap}
    for attachment in (a, b):  # each rule once, though the rewrite made it before the adopt
        _, chain, _ = await run("nft", "list", "chain", "bridge", wall.table,
                                f"guest_{attachment.tap}", timeout=10)  # fmt: skip
        rules = [line.strip() for line in chain.splitlines() if "drop" in line]
        assert len(rules) == len(set(rules)) == 7, chain
    assert not await reaches(in_a.ns, b.ip, 80) and await reaches(in_a.ns, HOST, ALLOWED_PORT)

    await restarted.detach(b)
    assert await firewall.guarded(wall) == {a.tap}
    assert b.tap not in (await run("nft", "list", "ruleset", timeout=10))[1]
    await restarted.detach(a)
    assert await firewall.guarded(wall) == set()


async def test_on_a_bridged_network_a_guest_keeps_its_own_mac_and_address(
    tmp_path: Path, dhcp_script: Path, served: Path
) -> None:
    """The operator's bridge: goldclone walls off only its own guests' frames, by the address
    their DHCP server gave them, which it learns from the answer."""
    host_bridge = "gctwbr0"
    await run("ip", "link", "add", host_bridge, "type", "bridge", "forward_delay", "0",
              timeout=10)  # fmt: skip
    try:
        await run("ip", "addr", "add", "10.78.0.1/24", "dev", host_bridge, timeout=10)
        await run("ip", "link", "set", host_bridge, "up", timeout=10)
        async with namespace() as ns, veth_into(ns) as (outer, inner):
            await run("ip", "link", "set", outer, "master", host_bridge, timeout=10)
            await run("ip", "-n", ns, "addr", "add", "10.78.0.2/24", "dev", inner, timeout=10)
            server = DhcpServer(ns, inner, tmp_path)
            await server.start("10.78.0.10", "10.78.0.250")
            networks = Networks(replace(CONFIG, bridged_bridge=host_bridge), tmp_path / "nets")
            try:
                attachment = await networks.attach("bridged", "vm-b")
                async with fake_guest(attachment.tap, attachment.mac) as guest:
                    await guest.dhcp(dhcp_script)
                    ip = await networks.wait_for_ip(attachment, timeout=10)
                    async with http_server(served, "0.0.0.0:80", ns):
                        assert await reaches(guest.ns, "10.78.0.2", 80)  # the LAN, as asked
                        await guest.exec("ip", "addr", "add", "10.78.0.99/24", "dev", guest.link)
                        await guest.exec("ip", "route", "add", "10.78.0.2/32", "dev",
                                         guest.link, "src", "10.78.0.99")  # fmt: skip
                        assert not await reaches(guest.ns, "10.78.0.2", 80)  # not as another
                        await guest.exec("ip", "route", "del", "10.78.0.2/32")
                        await guest.exec("ip", "link", "set", "dev", guest.link, "address",
                                         "52:54:00:77:77:77")  # fmt: skip
                        assert not await reaches(guest.ns, "10.78.0.2", 80)  # nor another MAC
                    dropped = await drops_in(networks, attachment)
                    assert dropped["ip"] > 0 and dropped["mac"] > 0, dropped
                    assert ip.startswith("10.78.0.")
            finally:
                await networks.teardown()
                await server.stop()
    finally:
        await run("ip", "link", "del", host_bridge, timeout=10)


async def drops_in(networks: Networks, attachment: Attachment) -> dict[str, int]:
    """The packets of ``attachment``'s own rules dropped so far, as the service counts them."""
    await networks.count()
    found = networks.walls.dropped(attachment.tap)
    assert found is not None
    return found
