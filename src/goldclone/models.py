"""The API's data: request bodies and the VM object, shared by the server and its clients."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal

import httpx
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

ChecksumType = Literal["md5", "sha1", "sha256", "sha512"]
NetworkType = Literal["bridged", "nat", "hostonly"]

CHECKSUM_HEX_LENGTH: dict[str, int] = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}
_HEX = re.compile(r"[0-9a-fA-F]+")
# Printable ASCII only (a non-ASCII host name goes in its punycode form), written without
# inline flags so that the OpenAPI schema can carry the same pattern.
_PORT = r"([1-5]?[0-9]{1,4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
_H16 = "[0-9a-fA-F]{1,4}"
_OCTET = r"(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])"
_IPV6 = "|".join(
    [
        f"({_H16}:){{7}}{_H16}",
        f"({_H16}:){{1,7}}:",
        *(f"({_H16}:){{1,{7 - n}}}(:{_H16}){{1,{n}}}" for n in range(1, 7)),
        f":((:{_H16}){{1,7}}|:)",
        rf"::[fF]{{4}}:({_OCTET}\.){{3}}{_OCTET}",
    ]
)
# A host name label has at most 63 characters.
_HOST = r"[A-Za-z0-9_~-]{1,63}(\.[A-Za-z0-9_~-]{1,63})*\.?"
_HTTP_URL_PATTERN = (
    r"^[hH][tT][tT][pP][sS]?://([A-Za-z0-9._~%!$&'()*+,;=:-]+@)?"
    rf"({_HOST}|\[({_IPV6})\])(:{_PORT})?([/?#][!-~]*)?$"
)
_HTTP_URL = re.compile(_HTTP_URL_PATTERN)


def _http_url(url: str | None) -> str | None:
    if url is None:
        return None
    try:
        valid = bool(_HTTP_URL.match(url)) and bool(httpx.URL(url).host)
    except httpx.InvalidURL:
        valid = False
    if not valid:
        raise ValueError("must be an http:// or https:// URL of printable ASCII")
    return url


HttpUrl = Annotated[
    StrictStr,
    Field(min_length=1, max_length=4096, json_schema_extra={"pattern": _HTTP_URL_PATTERN}),
]


def _checksum_variants() -> list[JsonValue]:
    """The checksum's length depends on its type; this says so in the JSON schema."""

    def hex_of(length: int) -> JsonValue:
        return {"type": "string", "pattern": f"^[0-9a-fA-F]{{{length}}}$"}

    variants: list[JsonValue] = [
        {"properties": {"checksum_type": {"const": kind}, "checksum": hex_of(length)},
         "required": ["checksum_type"]}
        for kind, length in CHECKSUM_HEX_LENGTH.items()
    ]  # fmt: skip
    variants.append(
        {"properties": {"checksum": hex_of(CHECKSUM_HEX_LENGTH["sha256"])},
         "not": {"required": ["checksum_type"]}}
    )  # fmt: skip
    return variants


class Status(StrEnum):
    CREATING = "creating"
    RUNNING = "running"
    STOPPED = "stopped"
    DELETING = "deleting"
    ERROR = "error"


class Phase(StrEnum):
    ACCEPTED = "accepted"
    DOWNLOADING = "downloading"
    CLONING = "cloning"
    BOOTING = "booting"
    READY = "ready"
    RUNNING = "running"
    STOPPED = "stopped"
    ERROR = "error"
    DELETING = "deleting"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageSpec(_Strict):
    """Where a VM's image package comes from, and what it must hash to."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"anyOf": _checksum_variants()})

    url: HttpUrl
    checksum: StrictStr
    checksum_type: ChecksumType = "sha256"

    _url = field_validator("url")(_http_url)

    @field_validator("checksum")
    @classmethod
    def _hex(cls, checksum: str) -> str:
        if not _HEX.fullmatch(checksum):
            raise ValueError("must be hexadecimal")
        return checksum

    @model_validator(mode="after")
    def _checksum_length(self) -> ImageSpec:
        expected = CHECKSUM_HEX_LENGTH[self.checksum_type]
        if len(self.checksum) != expected:
            raise ValueError(
                f"checksum: a {self.checksum_type} checksum has {expected} hex digits, "
                f"not {len(self.checksum)}"
            )
        return self

    @property
    def key(self) -> str:
        """The gold image's content address: ``<type>-<lowercase hex>``."""
        return f"{self.checksum_type}-{self.checksum.lower()}"


def _integral(value: object) -> object:
    """JSON has one number type: ``2.0`` is the integer 2, as JSON Schema says; ``2.5`` and
    ``"2"`` stay invalid."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Count = Annotated[StrictInt, BeforeValidator(_integral)]


Port = Annotated[StrictInt, BeforeValidator(_integral), Field(ge=1, le=65535)]
_PATH = r"^/[!-~]*$"


class HttpCheck(_Strict):
    port: Port
    path: Annotated[StrictStr, Field(max_length=1024, pattern=_PATH)] = "/"


class ReadyWhen(_Strict):
    """What "ready" means for a VM: exactly one of ``tcp`` (a port that accepts a
    connection), ``http`` (a GET that answers any status below 500) and ``guest_agent`` (the
    QEMU guest agent answers a ping), with an optional ``timeout`` in seconds."""

    tcp: Port | None = None
    http: HttpCheck | None = None
    guest_agent: Literal[True] | None = None
    timeout: Annotated[Count, Field(ge=1, le=86400)] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ReadyWhen:
        given = [name for name in ("tcp", "http", "guest_agent") if getattr(self, name)]
        if len(given) != 1:
            raise ValueError(
                'give exactly one of {"tcp": PORT}, {"http": {"port": PORT, "path": "/..."}} '
                'and {"guest_agent": true}, with an optional "timeout" in seconds'
            )
        return self

    def describe(self) -> str:
        if self.tcp is not None:
            return f"TCP port {self.tcp}"
        if self.http is not None:
            return f"HTTP GET :{self.http.port}{self.http.path}"
        return "the guest agent"


class CreateVMRequest(_Strict):
    """The body of ``POST /vms``."""

    image: ImageSpec
    cpus: Count = 2
    memory: Count = Field(default=1024, description="Megabytes.")
    network_type: NetworkType = "nat"
    headless: StrictBool = True
    callback_url: HttpUrl | None = None
    ready_when: ReadyWhen | None = None
    """Without it, a VM is ready when its IP is known."""

    _callback_url = field_validator("callback_url")(_http_url)


class ErrorBody(BaseModel):
    code: str
    message: str


class DownloadProgress(BaseModel):
    """How far an image download has come; ``bytes_total`` is null when the server sent no
    length."""

    bytes_done: int
    bytes_total: int | None


class TimelineEntry(BaseModel):
    phase: Phase
    at: str


class VM(BaseModel):
    """The VM object that GET returns and the callback carries."""

    id: str
    image: ImageSpec
    cpus: int
    memory: int
    network_type: NetworkType
    headless: bool
    callback_url: str | None
    ready_when: ReadyWhen | None = None
    ip_address: str = ""
    mac_address: str = ""
    status: Status = Status.CREATING
    guest_os: str = ""
    error: ErrorBody | None = None
    created_at: str
    timeline: list[TimelineEntry] = []
    progress: DownloadProgress | None = None
    """Present while the VM waits for its image to download."""


class VMList(BaseModel):
    vms: list[VM]


class Check(BaseModel):
    ok: bool
    reason: str | None = None


class Readiness(BaseModel):
    """``GET /readyz``: whether this service can create VMs now, part by part."""

    status: Literal["ok", "failing"]
    checks: dict[str, Check]


class ImageStatus(StrEnum):
    DOWNLOADING = "downloading"
    READY = "ready"
    ERROR = "error"


class Image(BaseModel):
    """A gold image: ready on disk, being fetched, or failed at its last fetch."""

    id: str
    """``<checksum_type>-<checksum>``, the image's address in ``/images/{id}``."""
    checksum: str
    checksum_type: ChecksumType
    url: str
    status: ImageStatus
    size_bytes: int = 0
    """Space taken on disk by the unpacked image."""
    vms: int = 0
    """How many VMs use the image; it can be deleted only when none does."""
    progress: DownloadProgress | None = None
    error: ErrorBody | None = None


class ImageList(BaseModel):
    images: list[Image]


def now_ms() -> str:
    """The current UTC time as RFC 3339 with milliseconds, e.g. ``2026-11-26T18:25:40.123Z``."""
    return _utc_now("milliseconds")


def now_s() -> str:
    """The current UTC time as RFC 3339 in whole seconds, e.g. ``2026-11-26T18:25:40Z``."""
    return _utc_now("seconds")


def _utc_now(timespec: str) -> str:
    return datetime.now(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")
