"""Guest networking, with real bridges, taps, nftables, dnsmasq and a busybox DHCP client.

Everything runs in a private network namespace (`unshare --net`); the suite refuses to run in
the host's. A fake guest (see ``netns.py``) stands in for a VM behind each tap.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from goldclone.drivers.qemu.network import Attachment, Networks, bridge
from goldclone.drivers.qemu.network.dnsmasq_leases import parse
from goldclone.drivers.qemu.network.manager import tap_name
from goldclone.drivers.qemu.network.sniffer import parse_ack
from goldclone.errors import InvalidRequest, IPTimeout
from goldclone.host.commands import run
from goldclone.settings import NETWORK_TYPES, NetworkConfig
from tests.netns import (
    DhcpServer,
    alive,
    dnsmasq_pids,
    fake_guest,
    ip_json,
    namespace,
    stop_pid,
    veth_into,
)

pytestmark = pytest.mark.root

# Not the defaults, so that a network left up by another test module cannot get in the way.
NAT = IPv4Network("172.31.123.0/24")
HOSTONLY = IPv4Network("172.31.124.0/24")
CONFIG = NetworkConfig(
    nat_bridge="gctnat0", nat_subnet=NAT, hostonly_bridge="gcthost0", hostonly_subnet=HOSTONLY
)
OURS = re.compile(r"gct.*|gc[0-9a-f]{12}")
MAC = re.compile(r"52:54:00(:[0-9a-f]{2}){3}")
HOST_BRIDGE = "gctbr0"
HOST_NET = IPv4Network("10.77.0.0/24")
UDHCPC_SCRIPT = """#!/bin/sh
[ "$1" = bound ] && ip addr add "$ip/$mask" dev "$interface"
exit 0
"""


@pytest.fixture(scope="session", autouse=True)
def private_netns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Afterwards, insist that no test left a dnsmasq behind."""
    yield
    marker = str(tmp_path_factory.getbasetemp())
    left = dnsmasq_pids(marker)
    for pid in left:
        asyncio.run(stop_pid(pid))
    assert not left, f"tests left dnsmasq processes running: {left}"


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "networks"


@pytest.fixture
async def networks(state_dir: Path) -> AsyncIterator[Networks]:
    nets = Networks(CONFIG, state_dir)
    yield nets
    await nets.teardown()


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "udhcpc.sh"
    path.write_text(UDHCPC_SCRIPT)
    path.chmod(0o755)
    return path


async def link(name: str) -> dict[str, Any] | None:
    _, out, _ = await run("ip", "-j", "-d", "link", "show", "dev", name, timeout=10, check=False)
    links: list[dict[str, Any]] = json.loads(out) if out.strip() else []
    return links[0] if links else None


async def addresses(name: str) -> list[str]:
    links = await ip_json("-4", "addr", "show", "dev", name)
    return [f"{a['local']}/{a['prefixlen']}" for entry in links for a in entry["addr_info"]]


async def our_tables() -> list[str]:
    """The test networks' nftables tables, as ``FAMILY NAME``."""
    _, out, _ = await run("nft", "-j", "list", "tables", timeout=10)
    tables = [i["table"] for i in json.loads(out)["nftables"] if "table" in i]
    return sorted(
        f"{t['family']} {t['name']}" for t in tables if t["name"].startswith("goldclone_gct")
    )


async def link_names() -> list[str]:
    return [str(entry["ifname"]) for entry in await ip_json("link", "show")]


async def nft_table(name: str, family: str = "ip") -> str:
    _, out, _ = await run("nft", "list", "table", family, name, timeout=10)
    return out


def read(path: str | Path) -> str:
    return Path(path).read_text()


def listdir(path: Path) -> list[Path]:
    return list(path.iterdir())


def lease_of(networks: Networks, attachment: Attachment) -> str | None:
    lease_file = networks.dnsmasq(attachment.network_type).lease_file
    return parse(lease_file.read_text()).get(attachment.mac)


async def test_refuses_unknown_and_unconfigured_types(networks: Networks) -> None:
    with pytest.raises(InvalidRequest, match=r"^network_type: .*bridged_bridge"):
        await networks.attach("bridged", "vm")
    with pytest.raises(InvalidRequest, match=r"^network_type: must be one of"):
        await networks.attach("wifi", "vm")
    assert "bridged_bridge" in networks.unavailable()["bridged"]
    assert "nat" not in networks.unavailable()
    assert await our_tables() == []


async def test_nat_comes_up_with_masquerade(networks: Networks) -> None:
    attachment = await networks.attach("nat", "282ee68a-2e4d-4bd7-9c0e-7f37e12fc489")

    bridge = await link("gctnat0")
    assert bridge is not None
    info = bridge["linkinfo"]["info_data"]
    assert (info["forward_delay"], info["stp_state"]) == (0, 0)
    assert await addresses("gctnat0") == ["172.31.123.1/24"]
    pid = networks.dnsmasq("nat").owned_pid()
    assert pid is not None and alive(pid)
    assert "masquerade" in await nft_table("goldclone_gctnat0")
    assert read("/proc/sys/net/ipv4/ip_forward").strip() == "1"

    assert attachment == Attachment(
        "282ee68a-2e4d-4bd7-9c0e-7f37e12fc489", "nat", attachment.mac, "gctnat0",
        "gc282ee68a2e4d", attachment.ip,
    )  # fmt: skip
    assert IPv4Address(attachment.ip) in NAT
    assert MAC.fullmatch(attachment.mac)
    tap = await link(attachment.tap)
    assert tap is not None and tap["master"] == "gctnat0" and "UP" in tap["flags"]
    assert tap["linkinfo"]["info_data"]["type"] == "tap"


async def test_hostonly_has_no_masquerade_or_route(networks: Networks) -> None:
    await networks.attach("hostonly", "vm-1")

    assert await addresses("gcthost0") == ["172.31.124.1/24"]
    assert await link("gctnat0") is None
    assert await our_tables() == ["bridge goldclone_gcthost0", "ip goldclone_gcthost0"]
    rules = await nft_table("goldclone_gcthost0")
    assert "masquerade" not in rules
    assert 'iifname "gcthost0" counter packets 0 bytes 0 drop comment "egress"' in rules
    assert "--dhcp-option=3" in networks.dnsmasq("hostonly").argv()


@pytest.mark.parametrize(("network_type", "subnet"), [("nat", NAT), ("hostonly", HOSTONLY)])
async def test_guest_gets_lease_and_detach_forgets_it(
    networks: Networks, script: Path, network_type: str, subnet: IPv4Network
) -> None:
    attachment = await networks.attach(network_type, "vm-2")
    async with fake_guest(attachment.tap, attachment.mac) as guest:
        await guest.dhcp(script)
        ip = await networks.wait_for_ip(attachment, timeout=10)
    assert subnet.network_address + 10 <= IPv4Address(ip) <= subnet.network_address + 250
    assert lease_of(networks, attachment) == ip

    await networks.detach(attachment)
    assert await link(attachment.tap) is None
    assert lease_of(networks, attachment) is None
    await networks.detach(attachment)  # again: nothing left to do, and no error


async def test_macs_and_taps_are_unique(networks: Networks) -> None:
    attachments = await asyncio.gather(*(networks.attach("nat", f"vm-{i}") for i in range(8)))
    assert len({a.mac for a in attachments}) == len({a.tap for a in attachments}) == 8
    assert all(len(a.tap) <= 15 for a in attachments)
    assert sorted(await ip_json_ports("gctnat0")) == sorted(a.tap for a in attachments)
    assert tap_name("not a uuid") == tap_name("not a uuid") != tap_name("other")


async def ip_json_ports(bridge: str) -> list[str]:
    return [str(entry["ifname"]) for entry in await ip_json("link", "show", "master", bridge)]


async def test_wait_for_ip_times_out(networks: Networks) -> None:
    attachment = await networks.attach("nat", "vm-3")
    with pytest.raises(IPTimeout, match=f"{attachment.mac}.*0.3 s"):
        await networks.wait_for_ip(attachment, timeout=0.3)


async def test_teardown_leaves_nothing(state_dir: Path, script: Path) -> None:
    networks = Networks(CONFIG, state_dir)
    nat = await networks.attach("nat", "vm-4")
    await networks.attach("hostonly", "vm-5")
    async with fake_guest(nat.tap, nat.mac) as guest:
        await guest.dhcp(script)
        await networks.wait_for_ip(nat, timeout=10)
    pids = [networks.dnsmasq(t).owned_pid() for t in ("nat", "hostonly")]

    await networks.teardown()

    assert [name for name in await link_names() if OURS.fullmatch(name)] == []
    assert not any(pid is not None and alive(pid) for pid in pids)
    assert await our_tables() == []
    assert listdir(state_dir) == []
    await networks.teardown()  # again: nothing left to do, and no error


async def test_new_instance_adopts_running_network(
    networks: Networks, state_dir: Path, script: Path
) -> None:
    attachment = await networks.attach("nat", "vm-6")
    pid = networks.dnsmasq("nat").owned_pid()
    await networks.close()

    restarted = Networks(CONFIG, state_dir)
    stored = Attachment.from_record("vm-6", json.loads(json.dumps(attachment.record())))
    await restarted.adopt(stored)
    assert restarted.dnsmasq("nat").owned_pid() == pid
    second = await restarted.attach("nat", "vm-7")
    assert second.mac != stored.mac
    assert restarted.dnsmasq("nat").owned_pid() == pid
    async with fake_guest(stored.tap, stored.mac) as guest:
        await guest.dhcp(script)
        assert await restarted.wait_for_ip(stored, timeout=10) == lease_of(restarted, stored)
    await restarted.detach(stored)
    await restarted.detach(second)
    assert await ip_json_ports("gctnat0") == []


async def test_changed_configuration_replaces_dnsmasq(networks: Networks, state_dir: Path) -> None:
    await networks.attach("nat", "vm-8")
    old_pid = networks.dnsmasq("nat").owned_pid()
    await networks.close()

    changed = Networks(replace(CONFIG, nat_subnet=IPv4Network("10.99.0.0/16")), state_dir)
    await changed.attach("nat", "vm-9")
    assert old_pid is not None and not alive(old_pid)
    found = await bridge.link(CONFIG.nat_bridge)
    assert found is not None and changed.dnsmasq("nat").adoptable_pid(found.index) is not None
    assert await addresses("gctnat0") == ["10.99.0.1/16"]
    await changed.teardown()


@pytest.fixture
async def host_bridge(tmp_path: Path) -> AsyncIterator[DhcpServer]:
    """A host bridge goldclone does not own, with a DHCP server elsewhere on it."""
    await run("ip", "link", "add", HOST_BRIDGE, "type", "bridge", "forward_delay", "0", timeout=10)
    await run("ip", "addr", "add", "10.77.0.1/24", "dev", HOST_BRIDGE, timeout=10)
    await run("ip", "link", "set", HOST_BRIDGE, "up", timeout=10)
    try:
        async with namespace() as ns, veth_into(ns) as (outer, inner):
            await run("ip", "link", "set", outer, "master", HOST_BRIDGE, timeout=10)
            await run("ip", "-n", ns, "addr", "add", "10.77.0.2/24", "dev", inner, timeout=10)
            server = DhcpServer(ns, inner, tmp_path)
            await server.start("10.77.0.10", "10.77.0.250")
            try:
                yield server
            finally:
                await server.stop()
    finally:
        await run("ip", "link", "del", HOST_BRIDGE, timeout=10)


async def test_bridged_ip_from_dhcp_ack(
    host_bridge: DhcpServer, state_dir: Path, script: Path
) -> None:
    networks = Networks(replace(CONFIG, bridged_bridge=HOST_BRIDGE), state_dir)
    attachment = await networks.attach("bridged", "vm-10")
    assert attachment.bridge == HOST_BRIDGE
    async with fake_guest(attachment.tap, attachment.mac) as guest:
        await guest.dhcp(script)
        ip = await networks.wait_for_ip(attachment, timeout=5)
    assert parse(host_bridge.lease_file.read_text())[attachment.mac] == ip
    [table] = await our_tables()  # the host's bridge is not ours: only the guest's own rules
    assert table.startswith("bridge goldclone_gctbr0_")
    assert f"ip saddr != {ip} " in await nft_table(table.split()[1], "bridge")

    await networks.detach(attachment)
    await networks.teardown()
    assert await our_tables() == []
    assert await link(attachment.tap) is None
    assert await link(HOST_BRIDGE) is not None


async def test_bridged_ip_from_lease_file_and_neighbours(
    host_bridge: DhcpServer, state_dir: Path, script: Path
) -> None:
    networks = Networks(replace(CONFIG, bridged_bridge=HOST_BRIDGE), state_dir)
    attachment = await networks.attach("bridged", "vm-11")
    async with fake_guest(attachment.tap, attachment.mac) as guest:
        await guest.dhcp(script)
        await networks.wait_for_ip(attachment, timeout=5)  # and its rules let it send from it
        await guest.exec("busybox", "ping", "-c", "1", "-W", "2", "10.77.0.1")
        await networks.close()  # a restart: nobody saw the DHCP ACK
        leased = parse(host_bridge.lease_file.read_text())[attachment.mac]

        config = replace(
            CONFIG, bridged_bridge=HOST_BRIDGE, bridged_lease_file=host_bridge.lease_file
        )
        from_leases = Networks(config, state_dir)
        assert await from_leases.wait_for_ip(attachment, timeout=5) == leased
        await from_leases.close()

        from_neighbours = Networks(replace(CONFIG, bridged_bridge=HOST_BRIDGE), state_dir)
        assert await from_neighbours.wait_for_ip(attachment, timeout=5) == leased
        await from_neighbours.detach(attachment)
        await from_neighbours.teardown()
    assert await link(attachment.tap) is None
    assert await our_tables() == []


async def test_bridged_bridge_must_exist(state_dir: Path) -> None:
    networks = Networks(replace(CONFIG, bridged_bridge="gcmissing0"), state_dir)
    with pytest.raises(Exception, match=r"gcmissing0 .* does not exist"):
        await networks.attach("bridged", "vm-12")


def test_defaults() -> None:
    config = NetworkConfig()
    assert (config.nat_bridge, config.hostonly_bridge) == ("gcnat0", "gchost0")
    assert str(config.nat_subnet) == "192.168.123.0/24"
    assert str(config.hostonly_subnet) == "192.168.124.0/24"
    assert config.bridged_bridge is None and config.bridged_lease_file is None


def test_attachment_round_trips() -> None:
    attachment = Attachment("vm", "nat", "52:54:00:12:34:56", "gcnat0", "gc0123456789ab")
    assert Attachment.from_record("vm", attachment.record()) == attachment
    earlier = {"network_type": "nat", "bridge": "gcnat0", "tap": "gc0123456789ab",
               "mac": "52:54:00:12:34:56"}  # fmt: skip
    assert Attachment.from_record("vm", earlier) == attachment  # a record without its machine
    assert set(NETWORK_TYPES) == {"nat", "hostonly", "bridged"}


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="too small"):
        NetworkConfig(nat_subnet=IPv4Network("10.0.0.0/25"))
    with pytest.raises(ValueError, match="interface name"):
        NetworkConfig(nat_bridge="a-very-long-bridge-name")
    with pytest.raises(ValueError, match="overlap"):
        NetworkConfig(hostonly_subnet=IPv4Network("192.168.0.0/16"))


def test_lease_file_parsing() -> None:
    text = (
        "1732650000 52:54:00:AA:bb:cc 192.168.123.17 guest 01:52:54:00:aa:bb:cc\n"
        "duid 00:01:00:01:2c:aa:bb:cc:dd:ee:ff:00:11:22\n"
        "1732650000 52:54:00:11:22:33 not-an-ip * *\n"
        "1732650\n"
    )
    assert parse(text) == {"52:54:00:aa:bb:cc": "192.168.123.17"}


def test_parse_ack_reads_only_acks_for_our_mac() -> None:
    mac = "52:54:00:12:34:56"

    def packet(op: int, chaddr: str, message_type: int) -> bytes:
        bootp = bytearray(240)
        bootp[0:3] = bytes([op, 1, 6])
        bootp[16:20] = IPv4Address("10.1.2.3").packed
        bootp[28:34] = bytes.fromhex(chaddr.replace(":", ""))
        bootp[236:240] = b"\x63\x82\x53\x63"
        options = bytes([0, 53, 1, message_type, 255])
        udp = (67).to_bytes(2, "big") + (68).to_bytes(2, "big") + bytes(4)
        ip = bytes([0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17]) + bytes(10)
        return ip + udp + bytes(bootp) + options

    assert parse_ack(packet(2, mac, 5), mac) == "10.1.2.3"
    assert parse_ack(packet(2, mac, 2), mac) is None  # an OFFER
    assert parse_ack(packet(1, mac, 5), mac) is None  # a request
    assert parse_ack(packet(2, "52:54:00:00:00:01", 5), mac) is None
    assert parse_ack(packet(2, mac, 5)[:100], mac) is None


@pytest.mark.parametrize(("network_type", "subnet"), [("nat", NAT), ("hostonly", HOSTONLY)])
async def test_owned_networks_answer_dns_with_the_hosts_names(
    networks: Networks, tmp_path: Path, network_type: str, subnet: IPv4Network
) -> None:
    """DHCP names the bridge address as DNS server, and dnsmasq there answers the names in
    the host's /etc/hosts (this test's own, bind-mounted in its private mount namespace)."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n10.9.8.7 buildcache.example\n")
    await run("mount", "--bind", str(hosts), "/etc/hosts")
    try:
        attachment = await networks.attach(network_type, "vm-dns")  # dnsmasq starts now
        script = tmp_path / "dhcp.sh"
        script.write_text('#!/bin/sh\n[ "$1" = bound ] && ip addr add "$ip/$mask" dev '
                          '"$interface" && echo "$dns" > "$0.dns"\nexit 0\n')  # fmt: skip
        script.chmod(0o755)
        async with fake_guest(attachment.tap, attachment.mac) as guest:
            await guest.dhcp(script)
            servers = (tmp_path / "dhcp.sh.dns").read_text().split()
            assert servers == [str(subnet.network_address + 1)]
            answer = await guest.exec(
                "busybox", "nslookup", "-type=a", "buildcache.example", servers[0]
            )
        assert "10.9.8.7" in answer, answer
        await networks.detach(attachment)
    finally:
        await run("umount", "/etc/hosts")
