"""An image's name in a registry, as the OCI distribution spec writes it:
``REGISTRY/REPOSITORY[:TAG][@sha256:DIGEST]``. goldclone needs the registry named (no implied
Docker Hub), and knows digests of one algorithm, sha256."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REGISTRY = r"(?:localhost|[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
_REGISTRY_PORT = r"[A-Za-z0-9-]+:[0-9]{1,5}"
PATTERN = (
    rf"^(?P<registry>{_REGISTRY}|{_REGISTRY_PORT})/(?P<repository>{_COMPONENT}(?:/{_COMPONENT})*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)
"""A reference goldclone takes (also the JSON schema's pattern)."""
_REFERENCE = re.compile(PATTERN)
MAX_LENGTH = 1024


@dataclass(frozen=True)
class Reference:
    registry: str
    """``host[:port]``, as the reference names it."""
    repository: str
    tag: str | None
    digest: str | None
    """``sha256:<hex>`` of the manifest: what a pinned reference is."""

    def __str__(self) -> str:
        tag = f":{self.tag}" if self.tag else ""
        digest = f"@{self.digest}" if self.digest else ""
        return f"{self.registry}/{self.repository}{tag}{digest}"

    @property
    def named(self) -> str:
        """The reference as a tag names it, without a digest: what a pool is matched by."""
        return str(replace(self, digest=None))

    @property
    def manifest(self) -> str:
        """What the registry's manifest URL ends with: the digest, or else the tag."""
        return self.digest or self.tag or "latest"

    def pinned(self, digest: str) -> Reference:
        return replace(self, digest=digest)


def parse(text: str) -> Reference:
    """A reference; ``ValueError`` with a reason that does not repeat ``text``."""
    if len(text) > MAX_LENGTH:
        raise ValueError(f"must be at most {MAX_LENGTH} characters")
    found = _REFERENCE.match(text)
    if found is None:
        raise ValueError(
            "must be REGISTRY/REPOSITORY[:TAG][@sha256:DIGEST], the registry named (a host with "
            "a dot or a port, or localhost), the repository in lowercase"
        )
    _check_registry(found["registry"])
    tag = found["tag"]
    return Reference(
        found["registry"],
        found["repository"],
        tag if tag or found["digest"] else "latest",
        found["digest"],
    )


def _check_registry(registry: str) -> None:
    host, port = registry, ""
    if registry.startswith("["):
        host, _, rest = registry[1:].partition("]")
        port = rest.removeprefix(":")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("must name its registry's IPv6 address as one") from None
    elif ":" in registry:
        host, port = registry.split(":")
    if port and int(port) > 65535:
        raise ValueError("must name its registry's port between 0 and 65535")


def digest_hex(digest: str) -> str:
    return digest.removeprefix("sha256:")
