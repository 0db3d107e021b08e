"""The API's data: request bodies and the VM object, shared by the server and its clients."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
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
    RUNNING = "running"
    STOPPED = "stopped"
    ERROR = "error"
    DELETING = "deleting"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageSpec(_Strict):
    """Where a VM's image package comes from, and what it must hash to."""

    url: Annotated[StrictStr, Field(min_length=1, max_length=4096)]
    checksum: StrictStr
    checksum_type: ChecksumType = "sha256"

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not re.match(r"(?i)^https?://[^/\s]+", url) or any(c.isspace() for c in url):
            raise ValueError("must be an http:// or https:// URL")
        return url

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


class CreateVMRequest(_Strict):
    """The body of ``POST /vms``."""

    image: ImageSpec
    cpus: StrictInt = 2
    memory: StrictInt = Field(default=1024, description="Megabytes.")
    network_type: NetworkType = "nat"
    headless: StrictBool = True
    callback_url: Annotated[StrictStr, Field(max_length=4096)] | None = None

    @field_validator("callback_url")
    @classmethod
    def _callback_http(cls, url: str | None) -> str | None:
        if url is not None and not re.match(r"(?i)^https?://[^/\s]+", url):
            raise ValueError("must be an http:// or https:// URL")
        return url


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
