"""Settings: every setting of every part and its embedded default (``settings_sources`` reads
them from a file and the environment), so that reading the configuration imports no driver,
network or image code."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Final, Literal

from goldclone import conversions
from goldclone.access import Token
from goldclone.conversions import Conversion
from goldclone.egress import Destination, EgressPolicy

DEFAULT_PORT = 12345
DRIVERS = ("qemu", "vmware", "synthetic")

NAT: Final = "nat"
HOSTONLY: Final = "hostonly"
BRIDGED: Final = "bridged"
NETWORK_TYPES: Final = (BRIDGED, NAT, HOSTONLY)
OWNED_TYPES: Final = (NAT, HOSTONLY)


def _check(what: str, conversion: Conversion, value: object) -> None:
    """``conversion``'s check of a value given in code rather than read from a setting."""
    try:
        conversion(value)
    except ValueError as exc:
        raise ValueError(f"{what} {value}: {exc}") from None


@dataclass(frozen=True)
class NetworkConfig:
    """The bridges and subnets of the three network types.

    ``nat`` and ``hostonly`` are bridges that goldclone creates and owns; each subnet must be
    a /24 or larger, the host takes its first address and DHCP hands out ``.10`` to ``.250``.
    ``bridged`` uses an existing host bridge that goldclone never creates or removes; it is
    unavailable while ``bridged_bridge`` is ``None``. ``bridged_lease_file`` optionally names
    the lease file (dnsmasq format) of the DHCP server that already serves that bridge.
    """

    nat_bridge: str = "gcnat0"
    nat_subnet: IPv4Network = field(default_factory=lambda: IPv4Network("192.168.123.0/24"))
    hostonly_bridge: str = "gchost0"
    hostonly_subnet: IPv4Network = field(default_factory=lambda: IPv4Network("192.168.124.0/24"))
    bridged_bridge: str | None = None
    bridged_lease_file: Path | None = None
    check_interval: float = 2.0
    """Seconds between two checks of the owned networks (a gone bridge, a dead dnsmasq)."""
    guest_host_ports: tuple[int, ...] = ()
    """Host ports (TCP and UDP) that guests on owned networks may reach on their bridge's
    address, besides DHCP and DNS."""
    egress_allow: tuple[Destination, ...] = ()
    egress_deny: tuple[Destination, ...] = ()

    def __post_init__(self) -> None:
        _check("nat_bridge", conversions.interface_name, self.nat_bridge)
        _check("hostonly_bridge", conversions.interface_name, self.hostonly_bridge)
        if self.bridged_bridge is not None:
            _check("bridged_bridge", conversions.interface_name, self.bridged_bridge)
        _check("nat_subnet", conversions.owned_subnet, self.nat_subnet)
        _check("hostonly_subnet", conversions.owned_subnet, self.hostonly_subnet)
        if self.nat_bridge == self.hostonly_bridge:
            raise ValueError("nat_bridge and hostonly_bridge must differ")
        if self.bridged_bridge in (self.nat_bridge, self.hostonly_bridge):
            raise ValueError(
                "bridged_bridge must be an existing host bridge, not one goldclone owns"
            )
        if self.nat_subnet.overlaps(self.hostonly_subnet):
            raise ValueError("nat_subnet and hostonly_subnet must not overlap")

    @property
    def egress(self) -> EgressPolicy:
        """Where guests on ``nat`` may send packets beyond the host."""
        return EgressPolicy(self.egress_allow, self.egress_deny)

    def bridge(self, network_type: str) -> str | None:
        """Return the bridge of ``network_type``, or ``None`` when it is not configured."""
        return {
            NAT: self.nat_bridge,
            HOSTONLY: self.hostonly_bridge,
            BRIDGED: self.bridged_bridge,
        }.get(network_type)

    def subnet(self, network_type: str) -> IPv4Network:
        """Return the subnet of an owned network type (``nat`` or ``hostonly``)."""
        return self.nat_subnet if network_type == NAT else self.hostonly_subnet


def host_address(subnet: IPv4Network) -> IPv4Address:
    """Return the address the host takes on an owned network's bridge."""
    return subnet.network_address + 1


def dhcp_range(subnet: IPv4Network) -> tuple[IPv4Address, IPv4Address]:
    """Return the first and last address that DHCP hands out on an owned network."""
    return subnet.network_address + 10, subnet.network_address + 250


HOST_TYPES: Final = ("auto", "fusion", "ws")

DEFAULT_LEASE_FILES: Final = (
    # macOS (Fusion): vmnet-dhcpd's lease files for the NAT and host-only networks
    Path("/var/db/vmware/vmnet-dhcpd-vmnet8.leases"),
    Path("/var/db/vmware/vmnet-dhcpd-vmnet1.leases"),
    # Linux (Workstation)
    Path("/etc/vmware/vmnet8/dhcpd/dhcpd.leases"),
    Path("/etc/vmware/vmnet1/dhcpd/dhcpd.leases"),
)


@dataclass(frozen=True)
class VMwareConfig:
    """Settings of the ``vmware`` driver.

    ``vmrun`` is a path or a command name; ``None`` looks on ``PATH`` and then in the usual
    install places of Fusion and Workstation. ``host_type`` is vmrun's ``-T``: ``fusion``,
    ``ws``, or ``auto`` (``fusion`` on macOS or for a vmrun inside ``VMware Fusion.app``,
    else ``ws``). With ``gui_fallback``, a headless start that vmrun refuses is tried again
    with a window (Fusion 7 and some Workstation hosts refuse ``nogui``). ``lease_files`` are
    vmnet-dhcpd lease files (ISC format) read when ``getGuestIPAddress`` has no answer; missing
    ones are skipped. ``command_timeout`` bounds every vmrun call that has no other limit.
    """

    vmrun: str | None = None
    host_type: str = "auto"
    gui_fallback: bool = True
    lease_files: tuple[Path, ...] = field(default=DEFAULT_LEASE_FILES)
    command_timeout: float = 120.0
    snapshot_name: str = "goldclone"

    def __post_init__(self) -> None:
        if self.host_type not in HOST_TYPES:
            raise ValueError(f"host_type must be one of {', '.join(HOST_TYPES)}")
        if not self.snapshot_name or '"' in self.snapshot_name:
            raise ValueError("snapshot_name must be a non-empty name without quotes")


PlacementPolicy = Literal["spread", "pack"]


def host_memory_mb() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)


@dataclass(frozen=True)
class StorePool:
    """A host's connections to a PostgreSQL store: ``size`` kept open, ``overflow`` more
    opened at a peak, and ``timeout`` seconds that a request waits for one before it is
    answered 503 ``store-unavailable``. Each host also holds one for ``LISTEN``. SQLite's
    connections are threads of the service and keep their own sizes."""

    size: int = 5
    overflow: int = 5
    timeout: float = 10.0

    @property
    def most(self) -> int:
        """The connections a host may hold at once, its ``LISTEN`` among them."""
        return self.size + self.overflow + 1


@dataclass(frozen=True)
class Limits:
    """What one VM may ask for, and what all of this host's VMs together may hold.

    A request outside the per-VM bounds gets 400 (never a silent change); one that would take
    the host past a total gets 409 ``capacity-exceeded``. A total of ``None`` is no limit.
    """

    min_cpus: int = 1
    max_cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    min_memory_mb: int = 64
    max_memory_mb: int = field(default_factory=host_memory_mb)
    max_vms: int | None = None
    total_cpus: int | None = None
    total_memory_mb: int | None = None

    def totals(self) -> dict[str, int | None]:
        """The host's totals, as placement and ``GET /hosts`` name them."""
        return {"vms": self.max_vms, "cpus": self.total_cpus, "memory": self.total_memory_mb}


STANDARD_SCHEDULE = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
"""Seconds before each attempt of a callback, after the one before: at once, 5 s, 5 min,
30 min, 2 h, 5 h, 10 h and 10 h, as Standard Webhooks retries."""


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("data")
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    database_url: str | None = field(default=None, repr=False)
    """An SQLAlchemy async URL; ``None`` is SQLite in the data dir. Its password is a secret."""
    store_pool: StorePool = field(default_factory=StorePool)
    limits: Limits = field(default_factory=Limits)
    max_body_bytes: int = 128 * 1024
    """Room for the largest valid create: 32 KiB of user data, 16 SSH keys, 4 KiB of metadata."""
    download_timeout: float = 30.0
    """Seconds without progress after which a download fails."""
    registry_auth_file: Path | None = None
    """A Docker-style auth file (``{"auths": {HOST: {"auth": BASE64}}}``): the credentials
    goldclone gives each registry that asks, for basic auth or for a token."""
    registry_credentials: tuple[tuple[str, str, str], ...] = field(default=(), repr=False)
    """Each registry's user and password (``host[:port]``, user, password), over the auth
    file's. Secrets."""
    registry_insecure: tuple[str, ...] = ()
    """Registries (``host[:port]``) reached over plain HTTP; every other one over TLS."""
    registry_ca_file: Path | None = None
    """CA certificates (PEM) that registries' TLS certificates may chain to, besides the
    system's."""
    log_format: str = "text"
    """``text`` or ``json`` (one JSON object per line)."""
    log_level: str = "info"
    image_cache_bytes: int | None = None
    """The gold cache's budget: past it, the least recently used unused images go."""
    reserve_mb: int = 256
    """Space kept free on the data dir's disk: a download that would eat into it is refused."""
    ip_timeout: float = 300.0
    """Seconds a guest has to get an IP: long enough for a real cloud guest that boots under
    TCG on a loaded host (the README's settings table has what was measured)."""
    ready_timeout: float = 600.0
    """Seconds a guest has, once it has its IP, to pass its ``ready_when`` probe, unless the
    request gives a timeout."""
    shutdown_timeout: float = 10.0
    """Seconds a guest gets to power off cleanly on DELETE before it is stopped hard."""
    reconcile_interval: float = 300.0
    """Seconds between two checks of the host against the store (orphans, stopped guests)."""
    host_id: str | None = None
    """This service's ID among those on one database; ``None``: made once and kept in the
    data dir (``service.hosts``)."""
    advertise_url: str | None = None
    """The URL other hosts of the fleet reach this host's API at: with ``fleet_secret``,
    they relay exec, files, ports and the console of this host's VMs to it."""
    fleet_secret: str | None = field(default=None, repr=False)
    """Shared by every host of a fleet; signs the caller of a relayed request
    (``relay_auth``)."""
    heartbeat_interval: float = 10.0
    """Seconds between two heartbeats of this host in the store."""
    host_lost_after: float = 60.0
    """Seconds without a heartbeat after which a host is ``lost`` and its VMs ``unknown``."""
    placement: PlacementPolicy = "spread"
    """Among the hosts with room for a VM (and no better reason to choose one): ``spread``
    picks the one with the fewest VMs, ``pack`` the one with the most."""
    callback_schedule: tuple[float, ...] = STANDARD_SCHEDULE
    """Seconds before each attempt of a callback, after the attempt before."""
    default_ttl: int = 12 * 3600
    """Seconds of a VM's lease when its request gives no ``ttl``; 0: no lease."""
    max_ttl: int = 7 * 86400
    """The longest lease a request or a renewal may ask for."""
    allow_no_lease: bool = False
    """Whether a request may ask for no lease (``ttl`` 0 or null)."""
    template_after: int = 0
    """Make a memory template of an image and shape once this many VMs of it have booted
    cold since the service started (``start: auto``); 0: only ``POST /images/{id}/templates``
    makes them."""
    qemu_binary: str = "qemu-system-x86_64"
    qemu_user: str | None = field(default_factory=lambda: "nobody" if os.geteuid() == 0 else None)
    """The user QEMU drops to once it has opened its files; ``None`` keeps the service's."""
    qemu_memory_overhead: int = 256
    """Megabytes a QEMU may take beyond its guest's RAM and TCG's cache (its cgroup's limit)."""
    qemu_tcg_cache: int = 128
    """Megabytes of TCG's translation cache (``tb-size``), counted in the memory limit."""
    console_max: int = 8
    """Megabytes of a guest's console log kept: past it, the oldest half goes."""
    qemu_disk_mbps: int = 0
    """Megabytes a second that one VM's disk may read and write together (0: no limit)."""
    qemu_disk_iops: int = 0
    """Operations a second that one VM's disk may do (0: no limit)."""
    accel: str = "auto"
    """``auto`` probes KVM and falls back to TCG; ``kvm`` or ``tcg`` forces one."""
    network: NetworkConfig = field(default_factory=NetworkConfig)
    driver: str = "qemu"
    """The hypervisor: ``qemu`` or ``vmware``."""
    vmware: VMwareConfig = field(default_factory=VMwareConfig)
    allow_private_urls: bool = True
    """Whether image and callback URLs may lead to loopback and private addresses; link-local
    and cloud metadata addresses are refused either way."""
    callback_secret: str | None = field(default=None, repr=False)
    """Signs callbacks (Standard Webhooks) when set."""
    api_tokens: tuple[str, ...] = field(default=(), repr=False)
    """Bearer tokens of the default tenant's ``admin`` role (``access``); with any token set,
    every endpoint but ``/healthz`` needs one."""
    metrics_tokens: tuple[str, ...] = field(default=(), repr=False)
    """Bearer tokens good for ``/metrics`` only (for a Prometheus server): ``metrics``
    tokens."""
    tokens: tuple[Token, ...] = field(default=(), repr=False)
    """Named tokens, each with the sha256 of its secret, a role and a tenant (``access``)."""

    def __post_init__(self) -> None:
        if self.heartbeat_interval <= 0 or self.host_lost_after <= self.heartbeat_interval:
            raise ValueError(
                f"GOLDCLONE_HOST_LOST_AFTER ({self.host_lost_after}) must be above "
                f"GOLDCLONE_HEARTBEAT_INTERVAL ({self.heartbeat_interval}), which must be above 0"
            )
        if self.default_ttl > self.max_ttl:
            raise ValueError(
                f"GOLDCLONE_DEFAULT_TTL ({self.default_ttl}) is above GOLDCLONE_MAX_TTL "
                f"({self.max_ttl})"
            )

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir.absolute() / 'state.db'}"
