"""Who may touch what on the API: tokens, each with a role and a tenant.

A token is named in the settings with the sha256 of its secret, never the secret. Its role
says what it may do (``Role``); its tenant owns the VMs it creates, and a token of a tenant
sees, waits on, streams and changes only that tenant's VMs, except an ``admin`` one, which sees
every tenant's. The older ``api_tokens`` are ``admin`` tokens of the default tenant and
``metrics_tokens`` are ``metrics`` tokens; with no token at all, the API is open and every
request is ``admin`` of the default tenant.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from enum import StrEnum

DEFAULT_TENANT = "default"
"""The tenant of the VMs made without a named token, and of those made before tenants."""
NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
"""What a token's or a tenant's name may be."""


class Role(StrEnum):
    """What a token may do; each role but ``metrics`` may do what the roles before it may."""

    METRICS = "metrics"
    """``GET /metrics`` only (a Prometheus server)."""
    READ = "read"
    """Read: the tenant's VMs, their events and consoles; images, pools, hosts."""
    USER = "user"
    """Also create, change and delete the tenant's VMs."""
    OPERATOR = "operator"
    """Also fetch and delete images, make templates, make and delete pools, forget hosts, and
    read ``/metrics``."""
    ADMIN = "admin"
    """Everything, on every tenant's VMs."""


_RANKS = {Role.METRICS: 0, Role.READ: 1, Role.USER: 2, Role.OPERATOR: 3, Role.ADMIN: 4}


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: its token's name, role and tenant; ``relayed`` when another
    host of the fleet authenticated it and relayed the request here (``relay_auth``)."""

    name: str
    role: Role
    tenant: str
    relayed: bool = False

    def may(self, needed: Role) -> bool:
        """Whether this principal may do what ``needed`` may; ``/metrics`` also takes an
        operator's or admin's token."""
        if needed is Role.METRICS:
            return self.role in (Role.METRICS, Role.OPERATOR, Role.ADMIN)
        return self.role is not Role.METRICS and _RANKS[self.role] >= _RANKS[needed]

    @property
    def tenant_seen(self) -> str | None:
        """The one tenant whose VMs this principal sees; ``None``: every tenant's."""
        return None if self.role is Role.ADMIN else self.tenant


ANONYMOUS = Principal("anonymous", Role.ADMIN, DEFAULT_TENANT)
"""Every request when no token is configured."""


@dataclass(frozen=True)
class Token:
    """A named token, as the settings give it: the sha256 of its secret (hex), its role and
    its tenant."""

    name: str
    sha256: str
    role: Role
    tenant: str

    @property
    def principal(self) -> Principal:
        return Principal(self.name, self.role, self.tenant)


class Access:
    """The tokens a server takes, and who each is."""

    def __init__(
        self,
        tokens: tuple[Token, ...] = (),
        api_tokens: tuple[str, ...] = (),
        metrics_tokens: tuple[str, ...] = (),
    ) -> None:
        known = [(bytes.fromhex(token.sha256), token.principal) for token in tokens]
        for kind, role, secrets in (("api", Role.ADMIN, api_tokens),
                                    ("metrics", Role.METRICS, metrics_tokens)):  # fmt: skip
            for number, secret in enumerate(secrets, 1):
                principal = Principal(f"{kind}-token-{number}", role, DEFAULT_TENANT)
                known.append((_digest(secret.encode()), principal))
        self._known = known

    @property
    def open(self) -> bool:
        """Whether the API takes requests without a token (none is configured)."""
        return not self._known

    def principal(self, presented: bytes) -> Principal | None:
        """Who the bearer token ``presented`` is, or ``None`` for a token not known. Every
        known digest is compared, in constant time, so the answer's timing tells nothing
        about which came close."""
        digest = _digest(presented)
        found = None
        for known, principal in self._known:
            if hmac.compare_digest(digest, known):
                found = principal
        return found


def digest_of(secret: str) -> str:
    """The sha256 of a token's secret, as the settings name it (hex)."""
    return _digest(secret.encode()).hex()


def _digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()
