"""Settings: embedded defaults, overridden by environment variables and then by CLI options.

Every setting of every part lives here, so that reading the configuration imports no driver,
network or image code: the CLI's client commands load this module alone.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Final

DEFAULT_PORT = 12345
DRIVERS = ("qemu", "vmware", "synthetic")

NAT: Final = "nat"
HOSTONLY: Final = "hostonly"
BRIDGED: Final = "bridged"
NETWORK_TYPES: Final = (BRIDGED, NAT, HOSTONLY)
OWNED_TYPES: Final = (NAT, HOSTONLY)

_IFNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")


def _check_ifname(what: str, name: str) -> None:
    if not _IFNAME.fullmatch(name):
        raise ValueError(
            f"{what} {name!r} is not a valid interface name: up to 15 of A-Za-z0-9_.-, "
            "starting with a letter or digit"
        )


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

    def __post_init__(self) -> None:
        _check_ifname("nat_bridge", self.nat_bridge)
        _check_ifname("hostonly_bridge", self.hostonly_bridge)
        if self.bridged_bridge is not None:
            _check_ifname("bridged_bridge", self.bridged_bridge)
        if self.nat_bridge == self.hostonly_bridge:
            raise ValueError("nat_bridge and hostonly_bridge must differ")
        if self.bridged_bridge in (self.nat_bridge, self.hostonly_bridge):
            raise ValueError(
                "bridged_bridge must be an existing host bridge, not one goldclone owns"
            )
        for name, subnet in (
            ("nat_subnet", self.nat_subnet),
            ("hostonly_subnet", self.hostonly_subnet),
        ):
            if subnet.prefixlen > 24:
                raise ValueError(f"{name} {subnet} is too small; use a /24 or larger")
        if self.nat_subnet.overlaps(self.hostonly_subnet):
            raise ValueError("nat_subnet and hostonly_subnet must not overlap")

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


def _host_memory_mb() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)


@dataclass(frozen=True)
class Limits:
    """What one VM may ask for, and what all of this host's VMs together may hold.

    A request outside the per-VM bounds gets 400 (never a silent change); one that would take
    the host past a total gets 409 ``capacity-exceeded``. A total of ``None`` is no limit.
    """

    min_cpus: int = 1
    max_cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    min_memory_mb: int = 64
    max_memory_mb: int = field(default_factory=_host_memory_mb)
    max_vms: int | None = None
    total_cpus: int | None = None
    total_memory_mb: int | None = None


STANDARD_SCHEDULE = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
"""Seconds before each attempt of a callback, after the one before: at once, 5 s, 5 min,
30 min, 2 h, 5 h, 10 h and 10 h, as Standard Webhooks retries."""


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("data")
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    database_url: str | None = None
    limits: Limits = field(default_factory=Limits)
    max_body_bytes: int = 128 * 1024
    """Room for the largest valid create: 32 KiB of user data, 16 SSH keys, 4 KiB of metadata."""
    download_timeout: float = 30.0
    """Seconds without progress after which a download fails."""
    log_format: str = "text"
    """``text`` or ``json`` (one JSON object per line)."""
    log_level: str = "info"
    image_cache_bytes: int | None = None
    """The gold cache's budget: past it, the least recently used unused images go."""
    reserve_mb: int = 256
    """Space kept free on the data dir's disk: a download that would eat into it is refused."""
    ip_timeout: float = 300.0
    """Seconds a guest has to get an IP: a real cloud guest under TCG takes 35-60 s, and
    4-5 minutes on a loaded host."""
    ready_timeout: float = 600.0
    """Seconds a guest has, once it has its IP, to pass its ``ready_when`` probe, unless the
    request gives a timeout."""
    shutdown_timeout: float = 10.0
    """Seconds a guest gets to power off cleanly on DELETE before it is stopped hard."""
    reconcile_interval: float = 300.0
    """Seconds between two checks of the host against the store (orphans, stopped guests)."""
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
    """Bearer tokens; when set, every endpoint but ``/healthz`` needs one of them."""
    metrics_tokens: tuple[str, ...] = field(default=(), repr=False)
    """Bearer tokens good for ``/metrics`` only (for a Prometheus server); when set,
    ``/metrics`` needs one of them or an API token."""

    def __post_init__(self) -> None:
        if self.default_ttl > self.max_ttl:
            raise ValueError(
                f"GOLDCLONE_DEFAULT_TTL ({self.default_ttl}) is above GOLDCLONE_MAX_TTL "
                f"({self.max_ttl})"
            )

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir.absolute() / 'state.db'}"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read ``GOLDCLONE_*`` variables (and ``PORT``, as the original did)."""
        env = os.environ if env is None else env
        s = cls()
        converters: dict[str, tuple[str, Callable[[str], object]]] = {
            "GOLDCLONE_DATA_DIR": ("data_dir", Path),
            "GOLDCLONE_HOST": ("host", str),
            "PORT": ("port", int),
            "GOLDCLONE_DATABASE_URL": ("database_url", str),
            "GOLDCLONE_DOWNLOAD_TIMEOUT": ("download_timeout", float),
            "GOLDCLONE_RESERVE_MB": ("reserve_mb", int),
            "GOLDCLONE_IMAGE_CACHE_BYTES": ("image_cache_bytes", int),
            "GOLDCLONE_LOG_FORMAT": ("log_format", _one_of(("text", "json"))),
            "GOLDCLONE_LOG_LEVEL": ("log_level", _one_of(("debug", "info", "warning", "error"))),
            "GOLDCLONE_IP_TIMEOUT": ("ip_timeout", float),
            "GOLDCLONE_READY_TIMEOUT": ("ready_timeout", float),
            "GOLDCLONE_SHUTDOWN_TIMEOUT": ("shutdown_timeout", float),
            "GOLDCLONE_RECONCILE_INTERVAL": ("reconcile_interval", float),
            "GOLDCLONE_CALLBACK_SCHEDULE": ("callback_schedule", _schedule),
            "GOLDCLONE_DEFAULT_TTL": ("default_ttl", int),
            "GOLDCLONE_MAX_TTL": ("max_ttl", int),
            "GOLDCLONE_ALLOW_NO_LEASE": ("allow_no_lease", _flag),
            "GOLDCLONE_TEMPLATE_AFTER": ("template_after", int),
            "GOLDCLONE_QEMU": ("qemu_binary", str),
            "GOLDCLONE_QEMU_USER": ("qemu_user", lambda user: None if user == "none" else user),
            "GOLDCLONE_ACCEL": ("accel", str),
            "GOLDCLONE_DRIVER": ("driver", _one_of(DRIVERS)),
            "GOLDCLONE_ALLOW_PRIVATE_URLS": ("allow_private_urls", _flag),
            "GOLDCLONE_CALLBACK_SECRET": ("callback_secret", str),
            "GOLDCLONE_API_TOKENS": ("api_tokens", _tokens),
            "GOLDCLONE_METRICS_TOKENS": ("metrics_tokens", _tokens),
        }
        network_converters: dict[str, tuple[str, Callable[[str], object]]] = {
            "GOLDCLONE_NAT_BRIDGE": ("nat_bridge", str),
            "GOLDCLONE_NAT_SUBNET": ("nat_subnet", IPv4Network),
            "GOLDCLONE_HOSTONLY_BRIDGE": ("hostonly_bridge", str),
            "GOLDCLONE_HOSTONLY_SUBNET": ("hostonly_subnet", IPv4Network),
            "GOLDCLONE_BRIDGED_BRIDGE": ("bridged_bridge", str),
            "GOLDCLONE_BRIDGED_LEASE_FILE": ("bridged_lease_file", Path),
            "GOLDCLONE_NETWORK_CHECK_INTERVAL": ("check_interval", float),
        }
        vmware_converters: dict[str, tuple[str, Callable[[str], object]]] = {
            "GOLDCLONE_VMRUN": ("vmrun", str),
            "GOLDCLONE_VMWARE_TYPE": ("host_type", _one_of(HOST_TYPES)),
            "GOLDCLONE_VMWARE_GUI_FALLBACK": ("gui_fallback", _flag),
            "GOLDCLONE_VMWARE_LEASE_FILES": ("lease_files", _paths),
        }
        limits_converters: dict[str, tuple[str, Callable[[str], object]]] = {
            "GOLDCLONE_MAX_CPUS": ("max_cpus", int),
            "GOLDCLONE_MAX_MEMORY": ("max_memory_mb", int),
            "GOLDCLONE_MAX_VMS": ("max_vms", int),
            "GOLDCLONE_TOTAL_CPUS": ("total_cpus", int),
            "GOLDCLONE_TOTAL_MEMORY": ("total_memory_mb", int),
        }
        limits = replace(s.limits, **_read(env, limits_converters))
        network = replace(s.network, **_read(env, network_converters))
        vmware = replace(s.vmware, **_read(env, vmware_converters))
        return replace(s, limits=limits, network=network, vmware=vmware, **_read(env, converters))


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value

    return check


def _flag(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _schedule(value: str) -> tuple[float, ...]:
    delays = tuple(float(part) for part in value.split(",") if part.strip())
    if not delays or any(delay < 0 for delay in delays):
        raise ValueError("must be seconds before each attempt, such as 0,5,300,1800")
    return delays


def _tokens(value: str) -> tuple[str, ...]:
    tokens = tuple(token.strip() for token in value.split(",") if token.strip())
    if any(len(token) < 16 for token in tokens):
        raise ValueError("each token needs at least 16 characters")
    return tokens


def _paths(value: str) -> tuple[Path, ...]:
    return tuple(Path(part) for part in value.split(os.pathsep) if part)


def _read(
    env: Mapping[str, str], converters: Mapping[str, tuple[str, Callable[[str], object]]]
) -> dict[str, Any]:
    """The attributes that ``env`` sets, converted; a bad value names its variable."""
    found: dict[str, Any] = {}
    for var, (attr, convert) in converters.items():
        if env.get(var):
            try:
                found[attr] = convert(env[var])
            except ValueError as exc:
                raise ValueError(f"{var}={env[var]!r}: {exc}") from None
    return found
