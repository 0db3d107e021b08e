"""``Networks``: the one object the QEMU driver asks for a guest NIC and its address."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import shutil
import time
import uuid
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Literal

from goldclone.drivers.qemu.network import addresses, bridge, dnsmasq_leases, firewall
from goldclone.drivers.qemu.network.attachment import Attachment
from goldclone.drivers.qemu.network.bridged import BridgedAddresses
from goldclone.drivers.qemu.network.dnsmasq import Dnsmasq
from goldclone.drivers.qemu.network.walls import Walls
from goldclone.egress import DEFAULT_REACH, Reach
from goldclone.errors import DriverUnavailable, InvalidRequest, IPTimeout, NetworkFailed
from goldclone.polling import until
from goldclone.settings import (
    BRIDGED,
    NAT,
    NETWORK_TYPES,
    OWNED_TYPES,
    NetworkConfig,
    host_address,
)

log = logging.getLogger(__name__)

LEASE_POLL = 0.1
LABEL = "goldclone "
"""The start of the alias of every bridge and tap a goldclone service makes; the rest is its
network state dir, which names its data dir."""
TAP_PREFIX = "gc"
HOSTS_ROOT = Path("/run/goldclone")
"""Where the DHCP servers' fixed addresses live (see ``Dnsmasq.hosts_dir``): one folder per
service, named by a hash of its network state dir."""
_OUR_TAP = re.compile(rf"{TAP_PREFIX}[0-9a-f]{{12}}")


@dataclass(frozen=True)
class Repair:
    """One repair of an owned network: what was found, what was done, how long it took."""

    network_type: str
    found: str
    done: str
    seconds: float


@dataclass(frozen=True)
class _Fault:
    kind: Literal["gone", "foreign", "no-dhcp", "unguarded"] | None
    reason: str | None


def tap_name(vm_id: str) -> str:
    """Return the tap name of VM ``vm_id``: ``gc`` and 12 hex digits, within the 15 allowed."""
    try:
        digits = uuid.UUID(vm_id).hex
    except ValueError:
        digits = hashlib.sha256(vm_id.encode()).hexdigest()
    return TAP_PREFIX + digits[:12]


async def _vm_taps_on(bridge_name: str) -> list[str]:
    return [port for port in await bridge.ports(bridge_name) if _OUR_TAP.fullmatch(port)]


class Networks:
    """The guest networks of one service, with their state in ``state_dir/<network type>/``.

    ``nat`` and ``hostonly`` are brought up on first use and then left running, so that guests
    outlive a restart of the service; a new instance adopts what it finds. ``teardown`` removes
    them. ``bridged`` only adds taps to a host bridge that someone else owns.
    """

    def __init__(self, config: NetworkConfig, state_dir: Path) -> None:
        self.config = config
        self.state_dir = state_dir.absolute()
        self.label = f"{LABEL}{self.state_dir}"
        """What this service's bridges and taps carry as their alias."""
        self.hosts_root = HOSTS_ROOT / hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:16]
        self._locks = {t: asyncio.Lock() for t in OWNED_TYPES}
        self._up: set[str] = set()
        self._attached: dict[str, Attachment] = {}
        self._bridged = BridgedAddresses(config.bridged_lease_file)
        self.walls = Walls(config, self.label, self._attached, self._bridge)

    def dnsmasq(self, network_type: str) -> Dnsmasq:
        """Return the DHCP server of owned network ``network_type`` (running or not)."""
        return Dnsmasq(
            self._bridge(network_type),
            self.config.subnet(network_type),
            self.state_dir / network_type,
            self.hosts_root / network_type,
            router=network_type == NAT,
        )

    def unavailable(self) -> dict[str, str]:
        """Each network type that can't be used on this host, with the reason."""
        if self.config.bridged_bridge is None:
            return {
                BRIDGED: "'bridged' is not available on this server; its operator must set "
                "bridged_bridge (GOLDCLONE_BRIDGED_BRIDGE) to the name of an existing host bridge"
            }
        return {}

    def _bridge(self, network_type: str) -> str:
        name = self.config.bridge(network_type) if network_type in NETWORK_TYPES else None
        if name is None:
            reason = self.unavailable().get(network_type)
            raise InvalidRequest(
                f"network_type: {reason or 'must be one of ' + ', '.join(NETWORK_TYPES)}"
            )
        return name

    async def claim(self) -> None:
        """Refuse, with ``DriverUnavailable``, to serve where an owned network's bridge
        exists and is not this service's: another service's, or nobody's that we know."""
        for network_type in OWNED_TYPES:
            if reason := await self._not_ours(network_type):
                raise DriverUnavailable(
                    f"{reason}; give this service bridges and subnets of its own "
                    f"(GOLDCLONE_{network_type.upper()}_BRIDGE and "
                    f"GOLDCLONE_{network_type.upper()}_SUBNET)"
                )

    async def _not_ours(self, network_type: str) -> str | None:
        """Why owned network ``network_type``'s bridge is not this service's to use; ``None``
        when it is ours, or does not exist."""
        name = self._bridge(network_type)
        found = await bridge.link(name)
        if found is None or found.alias == self.label:
            return None
        if found.alias.startswith(LABEL):
            owner = found.alias.removeprefix(LABEL).removesuffix("/networks")
            return f"the bridge {name} belongs to the goldclone service of the data dir {owner}"
        if not found.alias and self.dnsmasq(network_type).owned_pid() is not None:
            return None  # ours, made before bridges were labelled: our dnsmasq serves it
        return f"the bridge {name} exists and was not made by this goldclone service"

    async def ensure(self, network_type: str) -> None:
        """Bring owned network ``network_type`` up, or adopt it if it already runs."""
        if network_type in self._up:
            return
        async with self._locks[network_type]:
            if network_type in self._up:
                return
            if reason := await self._not_ours(network_type):
                raise NetworkFailed(reason)
            await self._bring_up(network_type)
            self._up.add(network_type)

    async def _bring_up(self, network_type: str) -> None:
        """Make the bridge (labelled as ours), its firewall table and its DHCP server, or
        adopt what of them is already right."""
        name = self._bridge(network_type)
        subnet = self.config.subnet(network_type)
        await bridge.ensure_bridge(
            name, IPv4Interface(f"{host_address(subnet)}/{subnet.prefixlen}")
        )
        await bridge.set_alias(name, self.label)
        if network_type == NAT:
            firewall.enable_forwarding()
        await self.walls.rewrite(network_type)
        found = await bridge.link(name)
        assert found is not None  # just made
        await self.dnsmasq(network_type).start(found.index)

    async def health(self) -> dict[str, str | None]:
        """Each owned network that is up (``network nat``, ...) and what is wrong with it;
        ``heal`` repairs the same things within a few seconds."""
        return {
            f"network {network_type}": (await self._fault(network_type)).reason
            for network_type in sorted(self._up)
        }

    async def _fault(self, network_type: str) -> _Fault:
        """What is wrong with owned network ``network_type`` now, if anything."""
        name = self._bridge(network_type)
        found = await bridge.link(name)
        if found is None:
            return _Fault("gone", f"the bridge {name} is gone")
        if found.alias != self.label and (reason := await self._not_ours(network_type)):
            return _Fault("foreign", reason)
        if self.dnsmasq(network_type).adoptable_pid(found.index) is None:
            return _Fault("no-dhcp", f"no DHCP server serves {name}")
        if bare := await self._unguarded(network_type):
            return _Fault("unguarded", f"the tap(s) {', '.join(bare)} on {name} have no rules")
        return _Fault(None, None)

    async def _unguarded(self, network_type: str) -> list[str]:
        guarded = await firewall.guarded(self.walls.wall(network_type))
        return sorted(set(await _vm_taps_on(self._bridge(network_type))) - (guarded or set()))

    async def unguarded(self) -> dict[str, list[str]]:
        """Each of this service's owned bridges that has VM taps without rules, with them:
        what ``goldclone doctor`` asks, without a running service."""
        found = {}
        for network_type in OWNED_TYPES:
            name = self._bridge(network_type)
            ours = await bridge.link_exists(name) and await self._not_ours(network_type) is None
            if ours and (bare := await self._unguarded(network_type)):
                found[name] = bare
        return found

    async def supervise(self) -> None:
        """Every ``check_interval`` seconds, repair each owned network that is up; see
        ``heal``, which ``attach`` calls too."""
        failing: dict[str, str] = {}  # a repair that keeps failing is logged once
        while True:
            await asyncio.sleep(self.config.check_interval)
            with contextlib.suppress(NetworkFailed):
                await self.count()
            for network_type in sorted(self._up):
                try:
                    await self.heal(network_type)
                except Exception as exc:
                    if failing.get(network_type) != str(exc):
                        log.exception("network %s could not be repaired; trying again every "
                                      "%g s", network_type, self.config.check_interval)  # fmt: skip
                    failing[network_type] = str(exc)
                else:
                    failing.pop(network_type, None)

    async def heal(self, network_type: str) -> Repair | None:
        """Repair owned network ``network_type`` if it is up and broken: a bridge that is gone
        is made again and the taps of its guests put back on it; a DHCP server that is dead,
        or that serves a bridge since replaced, is started again. Each repair is logged once,
        with what was found and what was done. Returns the repair, if one was needed."""
        async with self._locks[network_type]:
            if network_type not in self._up:
                return None
            name = self._bridge(network_type)
            started = time.monotonic()
            fault = await self._fault(network_type)
            if fault.kind is None:
                return None
            if fault.kind == "foreign":
                log.error("network %s: %s; leaving it alone", network_type, fault.reason)
                return None
            await self._bring_up(network_type)
            taps = [a.tap for a in self._attached.values() if a.bridge == name]
            if fault.kind == "gone":
                for tap in taps:
                    if await bridge.link_exists(tap):
                        await bridge.attach(tap, name)
                done = (
                    f"made the bridge again, put {len(taps)} tap(s) back on it and restarted DHCP"
                )
            elif fault.kind == "unguarded":
                done = "wrote its rules again"
            else:
                done = "restarted DHCP"
            repair = Repair(network_type, str(fault.reason), done, time.monotonic() - started)
            log.warning("network %s (%s): %s; %s, in %.2f s", network_type, name,
                        repair.found, repair.done, repair.seconds)  # fmt: skip
            return repair

    async def attach(
        self, network_type: str, machine: str, reach: Reach = DEFAULT_REACH
    ) -> Attachment:
        """Give ``machine`` a new tap on ``network_type``'s bridge, a new MAC, and on an owned
        network a new address, with rules that let it reach what ``reach`` says.

        Raises ``InvalidRequest`` for an unknown or unconfigured network type and
        ``NetworkFailed`` when the network cannot be set up.
        """
        name = self._bridge(network_type)
        if network_type in OWNED_TYPES:
            await self.ensure(network_type)
            await self.heal(network_type)  # a broken network is repaired before it is used
        elif await bridge.link_kind(name) != "bridge":
            raise NetworkFailed(f"bridge {name} for bridged networking does not exist on the host")
        tap = tap_name(machine)
        if await bridge.link_exists(tap):
            raise NetworkFailed(f"tap {tap} for VM {machine} already exists")
        mac = await addresses.new_mac((a.mac for a in self._attached.values()), self._lease_files())
        ip = self._new_ip(network_type) if network_type in OWNED_TYPES else None
        attachment = Attachment(machine, network_type, mac, name, tap, str(ip or ""),
                                **reach.record())  # fmt: skip
        self._attached[tap] = attachment  # its MAC and address are taken from here on
        try:
            if ip is not None:
                self.dnsmasq(network_type).fix(mac, ip)
            await self.walls.put(attachment)  # before the tap, so its first frame is checked
            await bridge.add_tap(tap, name, self.label)
            if network_type == BRIDGED:
                self._bridged.watch(attachment)
        except BaseException:
            del self._attached[tap]
            await self.walls.drop(attachment)
            if network_type in OWNED_TYPES:
                await self.dnsmasq(network_type).release(mac)
            raise
        log.info("attached %s (%s) to %s", tap, attachment.mac, name)
        return attachment

    async def set_reach(self, attachment: Attachment, reach: Reach) -> Attachment:
        """Change what the running ``attachment`` may reach, in one step; return it changed."""
        current = self._attached.get(attachment.tap, attachment)
        changed = replace(current, **reach.record())
        self._attached[attachment.tap] = changed
        try:
            await self.walls.put(changed, replacing=current)
        except BaseException:
            self._attached[attachment.tap] = current
            raise
        return replace(attachment, **reach.record())

    async def count(self) -> None:
        """Read what every network's rules have dropped so far (``supervise`` does it at each
        check, so that reading a VM costs no ``nft``)."""
        await self.walls.count(self._up)

    async def adopt(self, attachment: Attachment) -> None:
        """Take over the attachment of a guest that kept running through a restart.

        Its owned network is brought up or adopted, so the guest keeps its DHCP server, and its
        MAC is counted as taken. Raises ``NetworkFailed`` when the network cannot be set up.
        """
        if attachment.network_type in OWNED_TYPES:
            attachment = self._with_fixed_ip(attachment)
            self._attached[attachment.tap] = attachment
            await self.ensure(attachment.network_type)
        else:
            found = await self._bridged.known(attachment)
            attachment = replace(attachment, ip=found or "")
            self._attached[attachment.tap] = attachment
        await self.walls.put(attachment)

    def _with_fixed_ip(self, attachment: Attachment) -> Attachment:
        """``attachment``, with the address of its lease fixed for it if it had none (it
        was made by a release before addresses were fixed)."""
        dnsmasq = self.dnsmasq(attachment.network_type)
        if attachment.ip:
            if attachment.mac not in dnsmasq.fixed():  # its file was lost: fix it again
                dnsmasq.fix(attachment.mac, IPv4Address(attachment.ip))
            return attachment
        leased = dnsmasq_leases.lookup(dnsmasq.lease_file, attachment.mac)
        if leased is None:
            return attachment
        dnsmasq.fix(attachment.mac, IPv4Address(leased))
        return replace(attachment, ip=leased)

    def _new_ip(self, network_type: str) -> IPv4Address:
        dnsmasq = self.dnsmasq(network_type)
        taken = {IPv4Address(a.ip) for a in self._attached.values() if a.ip}
        taken |= set(dnsmasq.fixed().values())
        taken |= {IPv4Address(ip) for ip in dnsmasq_leases.read(dnsmasq.lease_file).values()}
        return addresses.new_ip(network_type, self.config.subnet(network_type), taken)

    def _lease_files(self) -> list[Path]:
        files = [self.dnsmasq(t).lease_file for t in OWNED_TYPES]
        if self.config.bridged_lease_file is not None:
            files.append(self.config.bridged_lease_file)
        return files

    async def wait_for_ip(self, attachment: Attachment, timeout: float) -> str:
        """Return the guest's IPv4 address once its DHCP lease is known.

        Raises ``IPTimeout`` when no address is known within ``timeout`` seconds.
        """
        try:
            async with asyncio.timeout(timeout):
                if attachment.network_type in OWNED_TYPES:
                    return await self._owned_ip(attachment)
                return await self._bridged_ip(attachment)
        except TimeoutError:
            pass
        raise IPTimeout(
            f"the guest with MAC {attachment.mac} on {attachment.bridge} got no DHCP lease "
            f"within {timeout:g} s"
        )

    async def _owned_ip(self, attachment: Attachment) -> str:
        await self.ensure(attachment.network_type)
        lease_file = self.dnsmasq(attachment.network_type).lease_file
        return await until(
            lambda: dnsmasq_leases.lookup(lease_file, attachment.mac), interval=LEASE_POLL
        )

    async def _bridged_ip(self, attachment: Attachment) -> str:
        ip = await self._bridged.find(attachment)
        current = self._attached.get(attachment.tap)
        if current is not None and current.ip != ip:
            learned = replace(current, ip=ip)
            self._attached[attachment.tap] = learned
            await self.walls.put(learned, replacing=current)  # its address, from now on
        return ip

    async def detach(self, attachment: Attachment) -> None:
        """Remove the VM's tap and forget its lease.

        Calling it again, or from a new instance after a restart, is fine.
        """
        known = self._attached.get(attachment.tap, attachment)
        await self._remove_tap(attachment.tap)
        await self.walls.drop(known)
        if attachment.network_type in OWNED_TYPES:
            await self.dnsmasq(attachment.network_type).release(attachment.mac)
        log.info("detached %s (%s)", attachment.tap, attachment.mac)

    async def forget(self, tap: str, mac: str | None) -> None:
        """Remove ``tap`` and release ``mac``'s lease on every owned network: ``detach`` for a
        NIC whose attachment was never recorded. A tap or lease that is not there is fine."""
        await self._remove_tap(tap)
        for network_type in sorted(self._up):  # rewritten without it: whatever it had is gone
            await self.walls.rewrite(network_type)
        if mac is not None:
            for network_type in OWNED_TYPES:
                await self.dnsmasq(network_type).release(mac)

    async def vm_taps(self) -> set[str]:
        """The names of the VM taps on the owned bridges that are ours."""
        taps: set[str] = set()
        for network_type in OWNED_TYPES:
            name = self._bridge(network_type)
            if await bridge.link_exists(name) and await self._not_ours(network_type) is None:
                taps.update(await _vm_taps_on(name))
        return taps

    async def _remove_tap(self, tap: str) -> None:
        await self._bridged.stop(tap)
        await bridge.delete_link(tap)
        self._attached.pop(tap, None)

    async def close(self) -> None:
        """Stop watching taps, and leave bridges, dnsmasq and taps running for the guests."""
        await self._bridged.close()

    async def teardown(self) -> None:
        """Remove everything this service set up: taps, DHCP servers, firewall tables, bridges
        and their state directories. The bridged network's host bridge stays.
        """
        await self.close()
        for tap, attachment in list(self._attached.items()):
            if attachment.network_type == BRIDGED:
                await bridge.delete_link(tap)
        self._attached.clear()
        await self.walls.remove_bridged()
        for network_type in OWNED_TYPES:
            await self._teardown_owned(network_type)

    async def _teardown_owned(self, network_type: str) -> None:
        async with self._locks[network_type]:
            self._up.discard(network_type)
            name = self._bridge(network_type)
            if reason := await self._not_ours(network_type):
                log.info("network %s left as it is: %s", network_type, reason)
                return
            dnsmasq = self.dnsmasq(network_type)
            await dnsmasq.stop()
            await firewall.remove(self.walls.wall(network_type))
            if await bridge.link_exists(name):
                for tap in await _vm_taps_on(name):
                    await bridge.delete_link(tap)
                await bridge.delete_link(name)
            await asyncio.to_thread(shutil.rmtree, dnsmasq.state_dir, ignore_errors=True)
            await asyncio.to_thread(shutil.rmtree, dnsmasq.hosts_dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # once both networks' folders are gone
            self.hosts_root.rmdir()
