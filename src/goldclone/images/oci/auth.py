"""Credentials for registries and the answers to their challenges.

Credentials come from a Docker-style auth file (``{"auths": {"HOST": {"auth": BASE64}}}``, or
``username``/``password`` in place of ``auth``), which the operator names. A registry that
answers 401 says how it wants to be asked (``WWW-Authenticate``): ``Basic``, with the host's
credentials, or ``Bearer``, with a token from the realm it names, asked for with the same
credentials (or none, for an anonymous pull). Tokens are kept per registry and scope until
shortly before they expire. No credential or token is ever logged or put in an error.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from goldclone.errors import DownloadFailed

_PARAM = re.compile(r'(\w+)="([^"]*)"')
TOKEN_MARGIN = 10.0
"""Seconds before its expiry that a token is no longer used."""
DEFAULT_TOKEN_LIFE = 60.0
"""A token whose answer gives no ``expires_in`` lives this long (the token spec's default)."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def basic(self) -> str:
        pair = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(pair).decode()


def read_auth_file(path: Path) -> dict[str, Credentials]:
    """The credentials of each registry (``host[:port]``) in a Docker-style auth file;
    ``ValueError`` naming what is wrong, never a value."""
    try:
        auths = json.loads(path.read_text()).get("auths", {})
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(
            f"cannot read {path} as a Docker-style auth file ({type(exc).__name__})"
        ) from None
    found: dict[str, Credentials] = {}
    for name, entry in auths.items():
        host = re.sub(r"^https?://", "", name).split("/")[0]
        try:
            if "auth" in entry:
                user, _, password = (
                    base64.b64decode(entry["auth"], validate=True).decode().partition(":")
                )
            else:
                user, password = entry["username"], entry["password"]
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise ValueError(f"{path}: the entry of {host} has no usable auth") from None
        found[host] = Credentials(str(user), str(password))
    return found


@dataclass
class _Token:
    header: str
    until: float


class Authorizer:
    """The ``Authorization`` header for each registry and scope, made when a registry asks."""

    def __init__(self, http: httpx.AsyncClient, credentials: dict[str, Credentials]) -> None:
        self._http = http
        self._credentials = credentials
        self._tokens: dict[tuple[str, str], _Token] = {}

    def header(self, registry: str, scope: str) -> str | None:
        """What a request to ``registry`` for ``scope`` carries before it is challenged."""
        token = self._tokens.get((registry, scope))
        if token is not None and token.until > time.monotonic():
            return token.header
        return None

    async def answer(self, registry: str, scope: str, challenge: str, timeout: float) -> str:
        """The header that answers ``challenge`` (a 401's ``WWW-Authenticate``)."""
        scheme, _, params = challenge.strip().partition(" ")
        creds = self._credentials.get(registry)
        if scheme.lower() == "basic":
            if creds is None:
                raise DownloadFailed(
                    f"registry {registry} asks for credentials, and none are configured for it"
                )
            header = creds.basic()
            self._tokens[(registry, scope)] = _Token(header, float("inf"))
            return header
        if scheme.lower() != "bearer":
            raise DownloadFailed(
                f"registry {registry} asks for {scheme!r} authentication, which goldclone does "
                f"not speak"
            )
        asked = dict(_PARAM.findall(params))
        realm = asked.get("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise DownloadFailed(f"registry {registry} names no usable token realm")
        query = {"service": asked.get("service", ""), "scope": asked.get("scope", scope)}
        headers = {"Authorization": creds.basic()} if creds else {}
        try:
            response = await self._http.get(realm, params=query, headers=headers, timeout=timeout)
        except httpx.HTTPError as exc:
            raise DownloadFailed(
                f"the token service of registry {registry} failed: {type(exc).__name__}"
            ) from None
        if response.status_code != 200:
            raise DownloadFailed(
                f"the token service of registry {registry} answered HTTP {response.status_code}"
            )
        try:
            body = response.json()
            token = body.get("token") or body.get("access_token")
            life = float(body.get("expires_in") or DEFAULT_TOKEN_LIFE)
        except (ValueError, AttributeError, TypeError):
            token = None
        if not isinstance(token, str) or not token:
            raise DownloadFailed(f"the token service of registry {registry} gave no token")
        header = f"Bearer {token}"
        self._tokens[(registry, scope)] = _Token(header, time.monotonic() + life - TOKEN_MARGIN)
        return header
