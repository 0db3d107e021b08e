"""The walls of goldclone's guest networks, in nftables, and the host's IPv4 forwarding switch.

Each network has a ``bridge``-family table, and an owned one also an ``ip``-family table of the
same name. Every change is one ``nft -f -`` transaction, so no half-written rule set is ever
live, and a guest's rules are in place before its tap exists (they match tap names).

* The ``bridge`` table sees every frame a guest's tap sends, whether or not the host's bridge
  netfilter also hands bridged IPv4 to the ``ip`` hooks (most hosts: not). A guest's chain lets
  through frames from its own MAC only, IPv4 from its own address only (0.0.0.0 for DHCP), ARP
  for that address only, never a DHCP server's reply, and no other protocol: IPv6, router
  advertisements included, is dropped. On an owned bridge a frame from one tap to another
  passes only between ``peers``. A tap without rules is a fault that the network's health
  reports and its repair mends.
* The ``ip`` table sees what goes to the host or through it: a guest reaches DHCP, DNS and the
  operator's ``host_ports`` on the host, and answers connections the host opened; on ``nat``
  it reaches beyond the host what the egress policy allows, masqueraded; on ``hostonly``
  nothing beyond the host, and nothing beyond the host reaches it.

Every drop is counted, with its reason as the rule's comment (``REASONS``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Final

from goldclone.egress import Destination, EgressPolicy
from goldclone.errors import CommandError, NetworkFailed
from goldclone.host.commands import run

TIMEOUT = 10.0
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
REASONS: Final = ("mac", "protocol", "arp", "ip", "dhcp-server", "peer", "host", "inbound",
                  "egress")  # fmt: skip
"""Why a packet was dropped: a spoofed MAC, a protocol other than IPv4 and ARP, ARP for another
address, a spoofed IPv4 source, a DHCP server's reply, another guest, the host, a connection
from beyond the host, a destination beyond the host."""


def table_name(bridge: str, suffix: str = "") -> str:
    """Return the name of ``bridge``'s nftables tables."""
    return "goldclone_" + re.sub(r"[^A-Za-z0-9_]", "_", bridge) + suffix


@dataclass(frozen=True)
class Guard:
    """One guest NIC as its rules see it: its tap, MAC and IPv4 address (``None`` while it is
    not known, on a bridged network before the guest's DHCP: then only DHCP passes), the
    ``group`` whose members it may reach, and its own narrower ``egress`` (``None``: the
    host's policy; ``()``: nothing beyond the host)."""

    tap: str
    mac: str
    ip: IPv4Address | None
    group: str | None = None
    egress: tuple[Destination, ...] | None = None


@dataclass(frozen=True)
class Wall:
    """One network's rules: its bridge, its type, and for an owned one the host's policy."""

    bridge: str
    network_type: str
    table: str
    host_ports: tuple[int, ...] = ()
    egress: EgressPolicy = field(default_factory=EgressPolicy)

    @property
    def owned(self) -> bool:
        return self.network_type != "bridged"


def _narrows(wall: Wall, guard: Guard) -> bool:
    """Whether ``guard`` has an egress chain of its own: a narrowed guest of ``nat`` whose
    address is known."""
    return wall.network_type == "nat" and guard.egress is not None and guard.ip is not None


def _chain(tap: str) -> str:
    return f"guest_{tap}"


def _egress_chain(tap: str) -> str:
    return f"egress_{tap}"


def _guest_rules(wall: Wall, guard: Guard) -> list[str]:
    own = str(guard.ip) if guard.ip is not None else "0.0.0.0"
    arp_sources = own if guard.ip is None else f"{{ {own}, 0.0.0.0 }}"
    # Only a frame forwarded to another port has an output interface: the two peer rules
    # are skipped for frames to the host.
    peers = ["iifname . oifname @peers return", 'meta oiftype ether counter drop comment "peer"']
    return [
        f'ether saddr != {guard.mac} counter drop comment "mac"',
        'ether type != { ip, arp } counter drop comment "protocol"',
        f'arp saddr ether != {guard.mac} counter drop comment "arp"',
        f'arp saddr ip != {arp_sources} counter drop comment "arp"',
        "ip saddr 0.0.0.0 udp sport 68 udp dport 67 return",
        f'ip saddr != {own} counter drop comment "ip"',
        'udp sport 67 counter drop comment "dhcp-server"',
    ] + (peers if wall.owned else [])


def _to(destination: Destination) -> str:
    if destination.port is None:
        return f"ip daddr {destination.network}"
    return f"ip daddr {destination.network} meta l4proto {{ tcp, udp }} th dport {destination.port}"


def _egress_rules(allowed: Iterable[Destination]) -> list[str]:
    # allowed ones go on to the host's policy, which a narrowed guest is held to as well
    return [f"{_to(d)} return" for d in allowed] + ['counter drop comment "egress"']


def _peers(guard: Guard, others: Iterable[Guard]) -> list[str]:
    if guard.group is None:
        return []
    pairs = []
    for other in others:
        if other.group == guard.group and other.tap != guard.tap:
            pairs += [f'"{guard.tap}" . "{other.tap}"', f'"{other.tap}" . "{guard.tap}"']
    return pairs


def _block(head: str, lines: Iterable[str]) -> str:
    body = "".join(f"  {line}\n" for line in lines)
    return f"{head} {{\n{body}}}\n"


def _elements(items: Iterable[str]) -> str:
    items = list(items)
    return f" elements = {{ {', '.join(items)} }}" if items else ""


def _bridge_table(wall: Wall, guards: list[Guard]) -> str:
    pairs = sorted({p for g in guards for p in _peers(g, guards)})
    taps = [f'"{g.tap}"' for g in guards]
    jumps = [f'"{g.tap}" : jump {_chain(g.tap)}' for g in guards]
    parts = [
        f"set guarded {{ type ifname;{_elements(taps)} }}",
        f"set peers {{ type ifname . ifname;{_elements(pairs)} }}",
        f"map guards {{ type ifname : verdict;{_elements(jumps)} }}",
    ]
    parts += [_block(f"chain {_chain(g.tap)}", _guest_rules(wall, g)) for g in guards]
    hook = "type filter hook {} priority filter; policy accept;"
    # Bridge-family hooks see the frames of every bridge on the host, so each rule names its
    # taps (this kernel has no bridge name to match; many lack it).
    into_host = [hook.format("input"), "iifname vmap @guards"]
    between = [hook.format("forward"), "iifname vmap @guards"]
    if wall.owned:  # on the operator's bridge, the other ports are not ours to wall off
        # a guest's own chain drops what it sends to a non-peer; this, what it would get
        # from a port without rules
        between += [
            "iifname . oifname @peers accept",
            'oifname @guarded counter drop comment "peer"',
        ]
    parts += [_block("chain input", into_host), _block("chain forward", between)]
    return _block(f"table bridge {wall.table}", parts)


def _ip_table(wall: Wall, subnet: IPv4Network, guards: list[Guard]) -> str:
    bridge = f'"{wall.bridge}"'
    host = [
        "type filter hook input priority filter; policy accept;",
        f"iifname != {bridge} accept",
        "ct state established,related accept",
        "udp dport 67 accept",
        "meta l4proto { tcp, udp } th dport 53 accept",
    ]
    if wall.host_ports:
        ports = ", ".join(str(p) for p in wall.host_ports)
        host.append(f"meta l4proto {{ tcp, udp }} th dport {{ {ports} }} accept")
    host.append('counter drop comment "host"')
    forward = [
        "type filter hook forward priority filter; policy accept;",
        # between two guests, when bridge netfilter passes bridged IPv4 here: the bridge
        # table has already decided
        f"iifname {bridge} oifname {bridge} accept",
        f"oifname {bridge} ct state established,related accept",
        f'oifname {bridge} counter drop comment "inbound"',
    ]
    parts = [_block("chain input", host)]
    if wall.network_type == "nat":
        narrowed = [g for g in guards if _narrows(wall, g)]
        forward.append(f"iifname {bridge} jump egress")
        egress = ["ip saddr vmap @narrowed"]
        egress += [f"{_to(d)} accept" for d in wall.egress.allow]
        egress += [f'{_to(d)} counter drop comment "egress"' for d in wall.egress.refused]
        jumps = [f"{g.ip} : jump {_egress_chain(g.tap)}" for g in narrowed]
        parts += [
            f"map narrowed {{ type ipv4_addr : verdict;{_elements(jumps)} }}",
            _block("chain egress", egress),
            *(_block(f"chain {_egress_chain(g.tap)}", _egress_rules(g.egress or ()))
              for g in narrowed),
            _block("chain postrouting", [
                "type nat hook postrouting priority srcnat; policy accept;",
                f"ip saddr {subnet} ip daddr != {subnet} masquerade",
            ]),
        ]  # fmt: skip
    else:
        forward.append(f'iifname {bridge} counter drop comment "egress"')
    parts.append(_block("chain forward", forward))
    return _block(f"table ip {wall.table}", parts)


def _delete(family: str, table: str) -> str:
    # Declaring the table first makes the delete valid even when it does not exist yet.
    return f"table {family} {table} {{}}\ndelete table {family} {table}\n"


async def _nft(script: str) -> None:
    try:
        await run("nft", "-f", "-", stdin=script.encode(), timeout=TIMEOUT)
    except CommandError as e:
        raise NetworkFailed(f"nftables update failed: {e.message}") from e


async def apply(wall: Wall, subnet: IPv4Network | None, guards: Iterable[Guard]) -> None:
    """Replace ``wall``'s tables, with the rules of each of ``guards``."""
    guards = list(guards)
    script = _delete("bridge", wall.table) + _bridge_table(wall, guards)
    if wall.owned:
        assert subnet is not None
        script += _delete("ip", wall.table) + _ip_table(wall, subnet, guards)
    await _nft(script)


def _unguard_script(wall: Wall, guard: Guard, others: Iterable[Guard]) -> str:
    # Each element and chain is added before it is deleted, so that deleting what is not there
    # (a repeated call, or rules that a repair never made) is no error.
    table = f"bridge {wall.table}"
    lines = [f'add element {table} guarded {{ "{guard.tap}" }}',
             f'delete element {table} guarded {{ "{guard.tap}" }}',
             f'add chain {table} {_chain(guard.tap)}',
             f'add element {table} guards {{ "{guard.tap}" : jump {_chain(guard.tap)} }}',
             f'delete element {table} guards {{ "{guard.tap}" }}',
             f"delete chain {table} {_chain(guard.tap)}"]  # fmt: skip
    if pairs := _peers(guard, others):
        lines += [f"add element {table} peers {{ {', '.join(pairs)} }}",
                  f"delete element {table} peers {{ {', '.join(pairs)} }}"]  # fmt: skip
    if _narrows(wall, guard):
        table = f"ip {wall.table}"
        chain = _egress_chain(guard.tap)
        lines += [f"add chain {table} {chain}",
                  f"add element {table} narrowed {{ {guard.ip} : jump {chain} }}",
                  f"delete element {table} narrowed {{ {guard.ip} }}",
                  f"delete chain {table} {chain}"]  # fmt: skip
    return "".join(line + "\n" for line in lines)


def _guard_script(wall: Wall, guard: Guard, others: Iterable[Guard]) -> str:
    # A chain that is there already (the guard of an adopted guest, which the network's
    # rewrite just made) is emptied, so that its rules are never there twice.
    table = f"bridge {wall.table}"
    chain = _chain(guard.tap)
    lines = [f"add chain {table} {chain}", f"flush chain {table} {chain}"]
    lines += [f"add rule {table} {chain} {rule}" for rule in _guest_rules(wall, guard)]
    lines += [f'add element {table} guards {{ "{guard.tap}" : jump {chain} }}',
              f'add element {table} guarded {{ "{guard.tap}" }}']  # fmt: skip
    if pairs := _peers(guard, others):
        lines.append(f"add element {table} peers {{ {', '.join(pairs)} }}")
    if _narrows(wall, guard):
        table = f"ip {wall.table}"
        chain = _egress_chain(guard.tap)
        lines += [f"add chain {table} {chain}", f"flush chain {table} {chain}"]
        lines += [f"add rule {table} {chain} {rule}" for rule in _egress_rules(guard.egress or ())]
        lines.append(f"add element {table} narrowed {{ {guard.ip} : jump {chain} }}")
    return "".join(line + "\n" for line in lines)


async def guard(
    wall: Wall, guard: Guard, others: Iterable[Guard], replacing: Guard | None = None
) -> None:
    """Put ``guard``'s rules in place, in ``wall``'s existing tables, instead of those of
    ``replacing`` (the same tap's earlier rules, if any); ``others`` are the other guards on
    the wall, for the peers of its group."""
    others = [g for g in others if g.tap != guard.tap]
    script = _unguard_script(wall, replacing, others) if replacing is not None else ""
    await _nft(script + _guard_script(wall, guard, others))


async def unguard(wall: Wall, guard: Guard, others: Iterable[Guard]) -> None:
    """Remove ``guard``'s rules from ``wall``'s tables; rules that are not there are fine."""
    others = [g for g in others if g.tap != guard.tap]
    await _nft(_unguard_script(wall, guard, others))


@dataclass
class Drops:
    """What rules dropped, in packets by reason: each guest's own (by its tap), and all."""

    by_tap: dict[str, dict[str, int]] = field(default_factory=dict)
    by_reason: dict[str, int] = field(default_factory=dict)

    def add(self, chain: str, reason: str, packets: int) -> None:
        self.by_reason[reason] = self.by_reason.get(reason, 0) + packets
        for prefix in (_chain(""), _egress_chain("")):
            if chain.startswith(prefix):
                mine = self.by_tap.setdefault(chain.removeprefix(prefix), {})
                mine[reason] = mine.get(reason, 0) + packets


def own_reasons(wall: Wall, guard: Guard) -> tuple[str, ...]:
    """The reasons that ``guard``'s own rules count drops by."""
    reasons: tuple[str, ...] = ("mac", "protocol", "arp", "ip", "dhcp-server")
    if wall.owned:
        reasons += ("peer",)
    if _narrows(wall, guard):
        reasons += ("egress",)
    return reasons


async def count(wall: Wall, drops: Drops) -> None:
    """Add what ``wall``'s rules dropped to ``drops``; tables that are not there dropped
    nothing."""
    for family in ("bridge", "ip") if wall.owned else ("bridge",):
        code, out, _ = await run("nft", "-j", "list", "table", family, wall.table,
                                 timeout=TIMEOUT, check=False)  # fmt: skip
        if code != 0:
            continue
        for item in json.loads(out).get("nftables", []):
            rule = item.get("rule")
            if rule is None or rule.get("comment") not in REASONS:
                continue
            for expression in rule.get("expr", []):
                if "counter" in expression:
                    packets = int(expression["counter"]["packets"])
                    drops.add(rule["chain"], rule["comment"], packets)


async def guarded(wall: Wall) -> set[str] | None:
    """The taps that have rules on ``wall``, or ``None`` when its bridge table is missing."""
    code, out, _ = await run("nft", "list", "set", "bridge", wall.table, "guarded",
                             timeout=TIMEOUT, check=False)  # fmt: skip
    if code != 0:
        return None
    found = re.search(r"elements = \{([^}]*)\}", out)
    return set(re.findall(r'"?([A-Za-z0-9_.-]+)"?', found[1])) if found else set()


async def remove(wall: Wall) -> None:
    """Delete ``wall``'s tables; tables that do not exist are fine."""
    script = _delete("bridge", wall.table)
    if wall.owned:
        script += _delete("ip", wall.table)
    await _nft(script)


def enable_forwarding() -> None:
    """Turn on IPv4 forwarding for this network namespace.

    It is left on at teardown: other software on the host may rely on it by then.
    """
    if IP_FORWARD.read_text().strip() != "1":
        IP_FORWARD.write_text("1\n")
