"""Reading one setting's value: from an environment variable's text, or from a TOML value.

Each function takes either form (``"8080"`` or ``8080``, ``"a,b"`` or ``["a", "b"]``) and
returns the typed value, or raises ``ValueError`` with a reason that never repeats the value,
so that the caller decides whether the value may be shown (a secret's may not).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from ipaddress import IPv4Network
from pathlib import Path
from types import UnionType
from urllib.parse import urlsplit

from goldclone.access import NAME, Role, Token
from goldclone.egress import Destination, destination
from goldclone.relay_auth import MIN_SECRET

Conversion = Callable[[object], object]

_INTERFACE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")
_DATABASE_URL = re.compile(r"[\w+]+://")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


_HOST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def host_id(value: object) -> str:
    """A host's ID: up to 64 letters, digits, dots, underscores and hyphens."""
    if not isinstance(value, str) or not _HOST_ID.fullmatch(value):
        raise ValueError(
            "must be 1-64 letters, digits, '.', '_' or '-', starting with one of the first two"
        )
    return value


def whole(low: int = 0, high: int | None = None) -> Callable[[object], int]:
    """A whole number from ``low`` to ``high``."""

    def convert(value: object) -> int:
        number = int(_number(value, int, int, "must be a whole number"))
        if number < low or (high is not None and number > high):
            raise ValueError(
                f"must be {low} or more" if high is None else f"must be {low} to {high}"
            )
        return number

    return convert


def seconds(value: object) -> float:
    """A finite number of seconds, 0 or more."""
    number = _number(value, float, int | float, "must be a number of seconds")
    if not math.isfinite(number) or number < 0:
        raise ValueError("must be a number of seconds, 0 or more")
    return float(number)


def _number(
    value: object, parse: Callable[[str], float], kinds: type | UnionType, reason: str
) -> float:
    """``value``, a number of ``kinds`` or its text (read by ``parse``); else ``ValueError``
    with ``reason``. A boolean is no number, though Python's ``bool`` is an ``int``."""
    if isinstance(value, str):
        try:
            value = parse(value.strip())
        except ValueError:
            raise ValueError(reason) from None
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ValueError(reason)
    return value  # type: ignore[return-value]  # an int or a float: one of kinds


def flag(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError("must be true or false")


def one_of(choices: tuple[str, ...]) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return text(value)

    return convert


def path(value: object) -> Path:
    return Path(text(value))


def interface_name(value: object) -> str:
    name = text(value)
    if not _INTERFACE_NAME.fullmatch(name):
        raise ValueError(
            "must be a valid interface name: up to 15 of A-Za-z0-9_.-, starting with a letter "
            "or digit"
        )
    return name


def owned_subnet(value: object) -> IPv4Network:
    """The subnet of a network goldclone owns: the host, DHCP's .10 to .250, a /24 or larger."""
    if not isinstance(value, IPv4Network):
        try:
            value = IPv4Network(text(value))
        except ValueError:
            raise ValueError("must be an IPv4 network such as 192.168.123.0/24") from None
    if value.prefixlen > 24:
        raise ValueError("is too small; use a /24 or larger")
    return value


def database_url(value: object) -> str:
    """An SQLAlchemy URL, checked for its form here: for one it cannot parse, SQLAlchemy's own
    error may repeat the whole URL, password and all (older releases do)."""
    url = text(value)
    if not _DATABASE_URL.match(url):
        raise ValueError("must be an SQLAlchemy URL, dialect+driver://user:password@host/database")
    return url


def base_url(value: object) -> str:
    """An ``http://`` or ``https://`` URL of a server: a scheme, a host, an optional port and
    path, nothing else; without a trailing slash."""
    url = text(value).rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise ValueError("must be an http:// or https:// URL such as http://10.0.0.5:12345")
    return url


def fleet_secret(value: object) -> str:
    """The secret that the hosts of a fleet share: 32 characters or more."""
    secret = text(value).strip()
    if len(secret) < MIN_SECRET:
        raise ValueError(f"needs at least {MIN_SECRET} characters")
    return secret


def user_or_none(value: object) -> str | None:
    """A user name, or ``none`` for no user."""
    name = text(value)
    return None if name == "none" else name


def _items(value: object, separator: str) -> list[object]:
    """The items of a TOML array, or of a ``separator``-separated string."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(separator) if part.strip()]
    if isinstance(value, list):
        return list(value)
    raise ValueError(f"must be an array, or a {separator}-separated string")


def tokens(value: object) -> tuple[str, ...]:
    """Bearer tokens of 16 characters or more."""
    found = tuple(text(item).strip() for item in _items(value, ","))
    if any(len(token) < 16 for token in found):
        raise ValueError("each token needs at least 16 characters")
    return found


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _table(value: object, of: str, shape: str) -> dict[object, object]:
    """A TOML table, or JSON text of an object (from the environment); ``shape`` says what
    it must be otherwise."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError(f"must be a JSON object of {of}") from None
    if not isinstance(value, dict):
        raise ValueError(shape)
    return value


def named_tokens(value: object) -> tuple[Token, ...]:
    """Named tokens: a table of tables (TOML; JSON text from the environment), each
    ``NAME = {sha256 = HEX, role = ROLE, tenant = NAME}``; ``tenant`` defaults to the token's
    name."""
    value = _table(value, "tokens", "must be a table of tokens, each a table")
    found = []
    for name, fields in value.items():
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ValueError("each token's name must be 1-63 lower-case letters, digits or '-'")
        if not isinstance(fields, dict) or set(fields) - {"sha256", "role", "tenant"}:
            raise ValueError(f"token {name}: must be a table of sha256, role and tenant")
        sha256 = fields.get("sha256")
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise ValueError(f"token {name}: sha256 must be the 64 hex digits of its secret's")
        role = fields.get("role")
        if role not in [r.value for r in Role]:
            raise ValueError(f"token {name}: role must be one of {', '.join(Role)}")
        tenant = fields.get("tenant", name)
        if not isinstance(tenant, str) or not NAME.fullmatch(tenant):
            raise ValueError(f"token {name}: tenant must be 1-63 lower-case letters, digits or '-'")
        found.append(Token(name, sha256, Role(role), tenant))
    if len({token.sha256 for token in found}) < len(found):
        raise ValueError("two tokens have one secret")
    return tuple(found)


def schedule(value: object) -> tuple[float, ...]:
    """Seconds before each attempt, after the one before."""
    try:
        delays = tuple(seconds(item) for item in _items(value, ","))
    except ValueError:
        delays = ()
    if not delays:
        raise ValueError("must be seconds before each attempt, such as 0,5,300,1800")
    return delays


def paths(value: object) -> tuple[Path, ...]:
    return tuple(path(item) for item in _items(value, os.pathsep))


def registries(value: object) -> tuple[str, ...]:
    """Registries as references name them: ``host[:port]``."""
    found = tuple(text(item).strip() for item in _items(value, ","))
    if any(
        not re.fullmatch(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?", r)
        for r in found
    ):
        raise ValueError("each must be host[:port]")
    return found


def registry_credentials(value: object) -> tuple[tuple[str, str, str], ...]:
    """Each registry's ``USER:PASSWORD``: a table (TOML; JSON text from the environment) of
    ``"HOST[:PORT]" = "USER:PASSWORD"``."""
    value = _table(value, "registries", 'must be a table of "HOST[:PORT]" = "USER:PASSWORD"')
    found = []
    for host, pair in value.items():
        registries(host)
        if not isinstance(pair, str) or ":" not in pair:
            raise ValueError(f"registry {host}: must be USER:PASSWORD")
        user, _, password = pair.partition(":")
        found.append((str(host), user, password))
    return tuple(found)


def ports(value: object) -> tuple[int, ...]:
    """TCP and UDP ports, 1 to 65535."""
    port = whole(1, 65535)
    try:
        return tuple(sorted({port(item) for item in _items(value, ",")}))
    except ValueError:
        raise ValueError("must be ports from 1 to 65535, such as 3142,8080") from None


def destinations(value: object) -> tuple[Destination, ...]:
    """Egress destinations: IPv4 networks with optional ports (``goldclone.egress``)."""
    return tuple(sorted({destination(text(item)) for item in _items(value, ",")}))
