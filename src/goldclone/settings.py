"""Settings: embedded defaults, overridden by a TOML file, then by environment variables, and
then (in the CLI) by command-line options.

Every setting of every part lives here, so that reading the configuration imports no driver,
network or image code. ``SETTINGS`` describes each one once (its variable, its key in the
file, how its value is read, whether it is a secret, its help and its default), and reading
the environment, reading the file and ``describe_settings`` all work from it.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Final, Literal

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
    host_id: str | None = None
    """This service's ID among those on one database; ``None``: made once and kept in the
    data dir (``service.hosts``)."""
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

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read ``GOLDCLONE_*`` variables (and ``PORT``, as the original did) over the defaults.
        Raises ``SettingsError``."""
        return _settings_from(_read_env(os.environ if env is None else env))

    @classmethod
    def load(cls, config: Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
        """Read the TOML file ``config`` (else the one ``GOLDCLONE_CONFIG`` names, if any), and
        the environment over it, over the defaults. Raises ``SettingsError``."""
        env = os.environ if env is None else env
        if config is None and env.get(CONFIG_VARIABLE):
            config = Path(env[CONFIG_VARIABLE])
        values = _read_file(config) if config is not None else {}
        return _settings_from(values | _read_env(env))


CONFIG_VARIABLE: Final = "GOLDCLONE_CONFIG"
"""The environment variable that names the config file when no ``--config`` does."""
_PREFIX: Final = "GOLDCLONE_"


class SettingsError(ValueError):
    """A setting that cannot be used: an unknown key, a bad value, an unreadable file or one
    that is not TOML. The message names the variable or the file and key; a secret's value is
    never in it."""


@dataclass(frozen=True)
class Setting:
    """One setting: where it is read from, where it goes, and how it is shown."""

    variable: str
    attribute: str
    """An attribute of ``Settings``, or ``part.name`` for one of a part (``network.nat_bridge``)."""
    convert: Conversion
    help: str
    default: str | None = None
    """The default as ``--help`` shows it; ``None``: the default value itself, as text."""
    secret: bool = False

    @property
    def key(self) -> str:
        """Its key in the config file: the variable without ``GOLDCLONE_``, in lower case."""
        return self.variable.removeprefix(_PREFIX).lower()

    def read(self, value: object, origin: str, assign: str = "=") -> object:
        """``value`` converted; an error names ``origin`` and shows the value unless secret."""
        try:
            return self.convert(value)
        except ValueError as exc:
            shown = "" if self.secret else f"{assign}{value!r}"
            raise SettingsError(f"{origin}{shown}: {exc}") from None


_s = Setting
_seconds, _count = conversions.seconds, conversions.whole()

SETTINGS: Final[tuple[Setting, ...]] = (
    _s("GOLDCLONE_HOST", "host", conversions.text, "address to listen on"),
    _s("PORT", "port", conversions.whole(0, 65535), "port to listen on"),
    _s("GOLDCLONE_DATA_DIR", "data_dir", conversions.path,
       "state, gold images and VMs; its absolute path must stay under 58 characters",
       "./data"),
    _s("GOLDCLONE_DATABASE_URL", "database_url", conversions.database_url,
       "the store: sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER:PASSWORD@HOST/DB "
       "(several hosts may share one PostgreSQL database)", "SQLite in the data dir", secret=True),
    _s("GOLDCLONE_DRIVER", "driver", conversions.one_of(DRIVERS),
       "the hypervisor: qemu, vmware (through vmrun) or synthetic (in-process, for trying)"),
    _s("GOLDCLONE_ACCEL", "accel", conversions.one_of(("auto", "kvm", "tcg")),
       "qemu: kvm, tcg, or auto (KVM only if a probe guest really runs under it)"),
    _s("GOLDCLONE_QEMU", "qemu_binary", conversions.text, "qemu: the QEMU binary"),
    _s("GOLDCLONE_QEMU_USER", "qemu_user", conversions.user_or_none,
       "qemu: the user QEMU drops to once it has opened its files; none keeps the service's",
       "nobody when run as root"),
    _s("GOLDCLONE_QEMU_MEMORY_OVERHEAD", "qemu_memory_overhead", conversions.whole(16),
       "qemu: MB a QEMU may take beyond its guest's RAM and TCG's cache, its cgroup's limit"),
    _s("GOLDCLONE_QEMU_TCG_CACHE", "qemu_tcg_cache", conversions.whole(16, 4096),
       "qemu: MB of TCG's translation cache (tb-size), counted in that limit"),
    _s("GOLDCLONE_CONSOLE_MAX", "console_max", conversions.whole(1, 1024),
       "qemu: MB of a guest's console log kept; past it, the oldest half goes"),
    _s("GOLDCLONE_QEMU_DISK_MBPS", "qemu_disk_mbps", _count,
       "qemu: MB a second that one VM's disk may read and write together (0: no limit)"),
    _s("GOLDCLONE_QEMU_DISK_IOPS", "qemu_disk_iops", _count,
       "qemu: operations a second that one VM's disk may do (0: no limit)"),
    _s("GOLDCLONE_LOG_FORMAT", "log_format", conversions.one_of(("text", "json")),
       "text, or json (one object per line)"),
    _s("GOLDCLONE_LOG_LEVEL", "log_level",
       conversions.one_of(("debug", "info", "warning", "error")),
       "debug, info, warning or error"),
    _s("GOLDCLONE_IP_TIMEOUT", "ip_timeout", _seconds,
       "seconds a guest has to get an IP before the VM fails with ip-timeout"),
    _s("GOLDCLONE_READY_TIMEOUT", "ready_timeout", _seconds,
       "seconds a guest has, once it has its IP, to pass its ready_when probe"),
    _s("GOLDCLONE_DOWNLOAD_TIMEOUT", "download_timeout", _seconds,
       "seconds without download progress before download-failed"),
    _s("GOLDCLONE_SHUTDOWN_TIMEOUT", "shutdown_timeout", _seconds,
       "seconds a running guest gets to power off on DELETE before it is stopped hard"),
    _s("GOLDCLONE_RECONCILE_INTERVAL", "reconcile_interval", _seconds,
       "seconds between two checks of the host against the store"),
    _s("GOLDCLONE_HOST_ID", "host_id", conversions.host_id,
       "this host's ID among the services on one database (letters, digits, . _ -)",
       "made once and kept in the data dir"),
    _s("GOLDCLONE_HEARTBEAT_INTERVAL", "heartbeat_interval", _seconds,
       "seconds between two heartbeats of this host in the store"),
    _s("GOLDCLONE_HOST_LOST_AFTER", "host_lost_after", _seconds,
       "seconds without a heartbeat after which a host is lost and its VMs unknown"),
    _s("GOLDCLONE_PLACEMENT", "placement", conversions.one_of(("spread", "pack")),
       "among hosts with room: spread (the fewest VMs) or pack (the most)"),
    _s("GOLDCLONE_RESERVE_MB", "reserve_mb", _count,
       "megabytes kept free on the data dir's disk; a download that would use them fails"),
    _s("GOLDCLONE_IMAGE_CACHE_BYTES", "image_cache_bytes", _count,
       "the gold cache's budget: past it, the least recently used unneeded images go", "none"),
    _s("GOLDCLONE_DEFAULT_TTL", "default_ttl", _count,
       "seconds of a VM's lease when its request gives no ttl (0: no lease)"),
    _s("GOLDCLONE_MAX_TTL", "max_ttl", _count,
       "the longest lease, in seconds, that a request or a renewal may ask for"),
    _s("GOLDCLONE_ALLOW_NO_LEASE", "allow_no_lease", conversions.flag,
       "whether a request may ask for no lease (ttl 0 or null)"),
    _s("GOLDCLONE_TEMPLATE_AFTER", "template_after", _count,
       "make a memory template of an image and shape after that many cold boots (0: never)"),
    _s("GOLDCLONE_CALLBACK_SCHEDULE", "callback_schedule", conversions.schedule,
       "seconds before each attempt of a callback, after the one before"),
    _s("GOLDCLONE_CALLBACK_SECRET", "callback_secret", conversions.text,
       "signs every callback (Standard Webhooks): whsec_<base64> or any string", secret=True),
    _s("GOLDCLONE_API_TOKENS", "api_tokens", conversions.tokens,
       "admin bearer tokens of the default tenant (16+ characters each); with any token set, "
       "every endpoint but /healthz needs one",
       secret=True),
    _s("GOLDCLONE_METRICS_TOKENS", "metrics_tokens", conversions.tokens,
       "bearer tokens (16+ characters each) good for GET /metrics only", secret=True),
    _s("GOLDCLONE_TOKENS", "tokens", conversions.named_tokens,
       "named tokens, each NAME = {sha256 = the hex sha256 of its secret, role = read, user, "
       "operator, admin or metrics, tenant = NAME (default: the token's name)}", "none",
       secret=True),
    _s("GOLDCLONE_ALLOW_PRIVATE_URLS", "allow_private_urls", conversions.flag,
       "whether image and callback URLs may lead to loopback and private addresses"),
    _s("GOLDCLONE_NAT_BRIDGE", "network.nat_bridge", conversions.interface_name,
       "the bridge of the nat network, which goldclone owns"),
    _s("GOLDCLONE_NAT_SUBNET", "network.nat_subnet", conversions.owned_subnet,
       "the nat network's subnet, a /24 or larger"),
    _s("GOLDCLONE_HOSTONLY_BRIDGE", "network.hostonly_bridge", conversions.interface_name,
       "the bridge of the hostonly network, which goldclone owns"),
    _s("GOLDCLONE_HOSTONLY_SUBNET", "network.hostonly_subnet", conversions.owned_subnet,
       "the hostonly network's subnet, a /24 or larger"),
    _s("GOLDCLONE_BRIDGED_BRIDGE", "network.bridged_bridge", conversions.interface_name,
       "an existing host bridge for bridged; without it, bridged answers 400"),
    _s("GOLDCLONE_BRIDGED_LEASE_FILE", "network.bridged_lease_file", conversions.path,
       "that bridge's DHCP server's lease file (dnsmasq format), to find IPs"),
    _s("GOLDCLONE_NETWORK_CHECK_INTERVAL", "network.check_interval", _seconds,
       "seconds between two checks (and repairs) of the owned networks"),
    _s("GOLDCLONE_GUEST_HOST_PORTS", "network.guest_host_ports", conversions.ports,
       "host ports guests may reach on their bridge's address besides DHCP and DNS",
       "none"),
    _s("GOLDCLONE_EGRESS_ALLOW", "network.egress_allow", conversions.destinations,
       "nat: CIDR[:PORT]s guests may reach although private or in egress_deny", "none"),
    _s("GOLDCLONE_EGRESS_DENY", "network.egress_deny", conversions.destinations,
       "nat: CIDR[:PORT]s guests may not reach, besides the private ranges", "none"),
    _s("GOLDCLONE_VMRUN", "vmware.vmrun", conversions.text,
       "vmware: the path of vmrun", "found on PATH, then where Fusion and Workstation put it"),
    _s("GOLDCLONE_VMWARE_TYPE", "vmware.host_type", conversions.one_of(HOST_TYPES),
       "vmware: vmrun's -T, fusion or ws; auto is fusion on macOS, else ws"),
    _s("GOLDCLONE_VMWARE_GUI_FALLBACK", "vmware.gui_fallback", conversions.flag,
       "vmware: start a VM with a window when vmrun refuses to start it headless"),
    _s("GOLDCLONE_VMWARE_LEASE_FILES", "vmware.lease_files", conversions.paths,
       "vmware: vmnet-dhcpd lease files, read when VMware Tools report no IP",
       "vmnet8's and vmnet1's on macOS and Linux"),
    _s("GOLDCLONE_MAX_CPUS", "limits.max_cpus", conversions.whole(1),
       "the most CPUs one VM may ask for", "the host's CPUs"),
    _s("GOLDCLONE_MAX_MEMORY", "limits.max_memory_mb", conversions.whole(1),
       "the most memory (MB) one VM may ask for", "the host's memory"),
    _s("GOLDCLONE_MAX_VMS", "limits.max_vms", _count,
       "the most VMs this host holds at once; past it a create gets 409", "no limit"),
    _s("GOLDCLONE_TOTAL_CPUS", "limits.total_cpus", _count,
       "the most CPUs all VMs of this host may hold together", "no limit"),
    _s("GOLDCLONE_TOTAL_MEMORY", "limits.total_memory_mb", _count,
       "the most memory (MB) all VMs of this host may hold together", "no limit"),
)  # fmt: skip
_BY_KEY: Final = {setting.key: setting for setting in SETTINGS}


@dataclass(frozen=True)
class SettingDescription:
    """A setting as ``serve --help`` and the docs list it."""

    variable: str
    key: str
    default: str
    help: str


def describe_settings() -> tuple[SettingDescription, ...]:
    """Every setting: its environment variable, its key in the config file, its default as
    text, and a line of help."""
    defaults = Settings()
    return tuple(
        SettingDescription(
            setting.variable,
            setting.key,
            setting.default or _as_text(_attribute(defaults, setting.attribute)),
            setting.help,
        )
        for setting in SETTINGS
    )


def _attribute(settings: Settings, attribute: str) -> object:
    value: object = settings
    for name in attribute.split("."):
        value = getattr(value, name)
    return value


def _as_text(value: object) -> str:
    """A default value as a variable would give it."""
    if value is None or value == ():
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(_as_text(item) for item in value)
    return str(value)


def _read_env(env: Mapping[str, str]) -> dict[str, object]:
    """The attributes that ``env`` sets, converted; an empty variable is an unset one."""
    return {
        setting.attribute: setting.read(env[setting.variable], setting.variable)
        for setting in SETTINGS
        if env.get(setting.variable)
    }


def _read_file(path: Path) -> dict[str, object]:
    """The attributes that the TOML file at ``path`` sets, converted."""
    try:
        table = tomllib.loads(path.read_text())
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SettingsError(f"{path}: not valid TOML: it is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from None
    values = {}
    for key, value in table.items():
        if key not in _BY_KEY:
            raise SettingsError(f"{path}: unknown key {key!r}{_suggestion(key)}")
        setting = _BY_KEY[key]
        values[setting.attribute] = setting.read(value, f"{path}: {key}", " = ")
    return values


def _suggestion(key: str) -> str:
    """``(did you mean ...?)`` for a key written as its variable, or misspelt."""
    as_key = key.lower().removeprefix(_PREFIX.lower())
    close = [as_key] if as_key in _BY_KEY else difflib.get_close_matches(as_key, _BY_KEY, 1)
    return f" (did you mean {close[0]}?)" if close else ""


def _settings_from(values: Mapping[str, object]) -> Settings:
    """The defaults with ``values`` (by attribute) in place; a check across settings that
    fails is a ``SettingsError`` too."""
    top: dict[str, Any] = {}
    parts: dict[str, dict[str, Any]] = {}
    for attribute, value in values.items():
        part, _, name = attribute.rpartition(".")
        (parts.setdefault(part, {}) if part else top)[name] = value
    try:
        defaults = Settings()
        changed = {
            part: replace(getattr(defaults, part), **fields) for part, fields in parts.items()
        }
        return replace(defaults, **changed, **top)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
