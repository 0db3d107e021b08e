"""Where settings come from: the embedded defaults (``Settings()``), overridden by a TOML
file, then by environment variables, and then (in the CLI) by command-line options.

``SETTINGS`` describes each setting once (its variable, its key in the file, how its value is
read, whether it is a secret, its help and its default), and reading the environment, reading
the file and ``describe_settings`` all work from it.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

from goldclone import conversions
from goldclone.conversions import Conversion
from goldclone.settings import DRIVERS, HOST_TYPES, Settings

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
    _s("GOLDCLONE_DB_POOL_SIZE", "store_pool.size", conversions.whole(1),
       "PostgreSQL: connections each host keeps open to the store"),
    _s("GOLDCLONE_DB_MAX_OVERFLOW", "store_pool.overflow", _count,
       "PostgreSQL: connections each host may open beyond those at a peak"),
    _s("GOLDCLONE_DB_POOL_TIMEOUT", "store_pool.timeout", _seconds,
       "PostgreSQL: seconds a request waits for a free connection before it gets 503"),
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
    _s("GOLDCLONE_REGISTRY_AUTH_FILE", "registry_auth_file", conversions.path,
       "a Docker-style auth file ({\"auths\": {HOST: {\"auth\": BASE64}}}): each registry's "
       "credentials, for basic auth or a token", "none: anonymous pulls"),
    _s("GOLDCLONE_REGISTRY_CREDENTIALS", "registry_credentials",
       conversions.registry_credentials,
       'each registry\'s credentials, over the auth file\'s: "HOST[:PORT]" = "USER:PASSWORD" '
       "(JSON from the environment)", "none", secret=True),
    _s("GOLDCLONE_REGISTRY_INSECURE", "registry_insecure", conversions.registries,
       "registries (host[:port]) reached over plain HTTP; every other one over TLS", "none"),
    _s("GOLDCLONE_REGISTRY_CA_FILE", "registry_ca_file", conversions.path,
       "CA certificates (PEM) registries' TLS certificates may chain to, besides the "
       "system's", "none"),
    _s("GOLDCLONE_SHUTDOWN_TIMEOUT", "shutdown_timeout", _seconds,
       "seconds a running guest gets to power off on DELETE before it is stopped hard"),
    _s("GOLDCLONE_RECONCILE_INTERVAL", "reconcile_interval", _seconds,
       "seconds between two checks of the host against the store"),
    _s("GOLDCLONE_HOST_ID", "host_id", conversions.host_id,
       "this host's ID among the services on one database (letters, digits, . _ -)",
       "made once and kept in the data dir"),
    _s("GOLDCLONE_ADVERTISE_URL", "advertise_url", conversions.base_url,
       "the URL other hosts of the fleet reach this host's API at; they relay exec, files, "
       "ports and the console of this host's VMs to it", "none: they do not"),
    _s("GOLDCLONE_FLEET_SECRET", "fleet_secret", conversions.fleet_secret,
       "32+ characters that every host of a fleet shares: they sign the caller of a relayed "
       "request with it", secret=True),
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


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Read ``GOLDCLONE_*`` variables (and ``PORT``, as the original did) over the defaults.
    Raises ``SettingsError``."""
    return _settings_from(_read_env(os.environ if env is None else env))


def load(config: Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file ``config`` (else the one ``GOLDCLONE_CONFIG`` names, if any), and
    the environment over it, over the defaults. Raises ``SettingsError``."""
    env = os.environ if env is None else env
    if config is None and env.get(CONFIG_VARIABLE):
        config = Path(env[CONFIG_VARIABLE])
    values = _read_file(config) if config is not None else {}
    return _settings_from(values | _read_env(env))


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
