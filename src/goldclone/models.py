"""The API's data: request bodies and the VM object, shared by the server and its clients."""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal

import httpx
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from goldclone.access import DEFAULT_TENANT
from goldclone.egress import Reach, destination
from goldclone.labels import Labels

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
    UNKNOWN = "unknown"
    """Never stored: shown for a VM whose host has not been heard from (its ``lost``)."""


class Phase(StrEnum):
    ACCEPTED = "accepted"
    DOWNLOADING = "downloading"
    CLONING = "cloning"
    BOOTING = "booting"
    RESTORING = "restoring"
    CLAIMED = "claimed"
    READY = "ready"
    RUNNING = "running"
    STOPPED = "stopped"
    ERROR = "error"
    EXPIRED = "expired"
    DELETING = "deleting"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FieldProblem(ValueError):
    """A rule of a whole object that one of its fields breaks (a checksum too short for its
    type): raised by a model validator, it is reported under that field, ``image.checksum``,
    rather than under the object."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def explain_validation_error(exc: ValidationError) -> str:
    """The API's message for a request that ``exc`` refused: each problem as its field's
    dotted path and what is wrong with it, e.g. ``image.checksum: must be hexadecimal; cpus:
    Input should be a valid integer``. The server and the CLI say the same with it."""
    return explain_errors(exc.errors())


def explain_errors(errors: Iterable[Mapping[str, Any]]) -> str:
    """``explain_validation_error`` of pydantic's error details (``ValidationError.errors()``,
    or FastAPI's, whose locations are relative to the body)."""
    parts = []
    for error in errors:
        path = [str(part) for part in error.get("loc", ())]
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, FieldProblem):
            path.append(cause.field)
        parts.append(f"{'.'.join(path) or 'body'}: {_what_is_wrong(error, cause)}")
    return "; ".join(parts)


def _what_is_wrong(error: Mapping[str, Any], cause: object) -> str:
    kind = error.get("type")
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "is required"
    if kind == "value_error" and isinstance(cause, ValueError):
        return str(cause)  # pydantic's msg puts "Value error, " before it
    return str(error.get("msg", "is invalid"))


def explain_json_error(exc: json.JSONDecodeError) -> str:
    """Where a JSON document breaks, and how: ``line 4, column 1: Illegal trailing comma
    before end of object``."""
    return f"line {exc.lineno}, column {exc.colno}: {exc.msg}"


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
            raise FieldProblem(
                "checksum",
                f"a {self.checksum_type} checksum has {expected} hex digits, "
                f"not {len(self.checksum)}",
            )
        return self

    @property
    def key(self) -> str:
        """The gold image's content address: ``<type>-<lowercase hex>``."""
        return f"{self.checksum_type}-{self.checksum.lower()}"


Count = StrictInt
"""A whole number, as JSON writes one: ``2.0``, ``"2"`` and ``true`` are not counts."""
Port = Annotated[StrictInt, Field(ge=1, le=65535)]
MIN_MEMORY_MB = 128
"""The least memory a VM, template or pool machine may have. The demo guest boots with 80 MB
under QEMU (with less, its kernel runs out of memory unpacking its initramfs, and panics);
this leaves room for a larger kernel. A host may ask for more (``Limits.min_memory_mb``)."""
MemoryMB = Annotated[Count, Field(ge=MIN_MEMORY_MB, description="Megabytes.")]
_PATH = r"^/[!-~]*$"


def _true(value: bool) -> bool:
    if not value:
        raise ValueError("must be true, or left out")
    return value


StrictTrue = Annotated[StrictBool, AfterValidator(_true), Field(json_schema_extra={"const": True})]
"""``true`` itself: ``Literal[True]`` takes ``1`` and ``1.0`` too."""


class HttpCheck(_Strict):
    port: Port
    path: Annotated[StrictStr, Field(max_length=1024, pattern=_PATH)] = "/"


class ReadyWhen(_Strict):
    """What "ready" means for a VM: exactly one of ``tcp`` (a port that accepts a
    connection), ``http`` (a GET that answers any status below 500) and ``guest_agent`` (the
    QEMU guest agent answers a ping), with an optional ``timeout`` in seconds."""

    tcp: Port | None = None
    http: HttpCheck | None = None
    guest_agent: StrictTrue | None = None
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


_DNS_LABEL_PATTERN = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
_DNS_LABEL = re.compile(_DNS_LABEL_PATTERN)


def is_dns_label(name: str) -> bool:
    return _DNS_LABEL.fullmatch(name) is not None


def _dns_label(name: str | None) -> str | None:
    if name is not None and not is_dns_label(name):
        raise ValueError(
            "must be a DNS label: 1-63 characters of a-z, 0-9 and '-', "
            "not starting or ending with '-'"
        )
    return name


SSH_KEY_TYPES = frozenset(
    {
        "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)  # fmt: skip


def _ssh_public_key(key: str) -> str:
    """An OpenSSH public key line, ``TYPE BASE64 [COMMENT]``, whose key data is whole: a
    sequence of length-prefixed fields, the first naming the same type (every public key
    format OpenSSH has is one). A private key, a fingerprint or a cut-off key is refused."""
    fields = key.split(maxsplit=2)
    if len(fields) < 2 or fields[0] not in SSH_KEY_TYPES:
        raise ValueError(
            "is not an OpenSSH public key: expected 'TYPE BASE64 [COMMENT]' with TYPE one of "
            + ", ".join(sorted(SSH_KEY_TYPES))
        )
    try:
        blob = base64.b64decode(fields[1], validate=True)
    except binascii.Error:
        raise ValueError("is not an OpenSSH public key: its key data is not base64") from None
    parts = _ssh_fields(blob)
    if parts is None or len(parts) < 2 or parts[0] != fields[0].encode():
        raise ValueError(f"is not an OpenSSH public key: its key data is not a {fields[0]} key")
    return key


def _ssh_fields(blob: bytes) -> list[bytes] | None:
    """``blob`` split into its length-prefixed fields, or None if it is not such a sequence."""
    parts, at = [], 0
    while at < len(blob):
        if at + 4 > len(blob):
            return None
        (length,) = struct.unpack_from(">I", blob, at)
        at += 4 + length
        if at > len(blob):
            return None
        parts.append(blob[at - length : at])
    return parts


SSHPublicKey = Annotated[
    StrictStr,
    Field(min_length=1, max_length=2048, pattern=r"^[!-~][ -~]*$"),
    AfterValidator(_ssh_public_key),
]
USER_DATA_MAX_BYTES = 32 * 1024
METADATA_MAX_ENTRIES = 64
METADATA_MAX_BYTES = 4096
_METADATA_KEY_PATTERN = "^[a-z0-9._-]{1,128}$"
MetadataKey = Annotated[StrictStr, Field(pattern=_METADATA_KEY_PATTERN)]
RESERVED_METADATA_KEYS = ("metadata", "userdata", "vendordata")
"""What cloud-init's VMware datasource reads from ``guestinfo``; a ``metadata`` key becomes
``guestinfo.<key>`` there, so these (and keys below them) are refused on every driver."""


def _check_user_data(user_data: str | None) -> str | None:
    if user_data is None:
        return None
    if (size := len(user_data.encode())) > USER_DATA_MAX_BYTES:
        raise ValueError(f"is {size} bytes; at most {USER_DATA_MAX_BYTES} are allowed")
    if not user_data.startswith(("#cloud-config", "#!")):
        raise ValueError("must be a #cloud-config document or a #! script")
    return user_data


def _check_metadata(metadata: dict[str, str]) -> dict[str, str]:
    if (size := sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items())) > (
        METADATA_MAX_BYTES
    ):
        raise ValueError(
            f"keys and values take {size} bytes; at most {METADATA_MAX_BYTES} are allowed"
        )
    for key in metadata:
        if key.split(".")[0] in RESERVED_METADATA_KEYS:
            raise ValueError(
                f"key {key!r} is reserved: {', '.join(RESERVED_METADATA_KEYS)} and the keys "
                "below them are what cloud-init reads from VMware's guestinfo"
            )
    return metadata


_GROUP_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
NetworkGroup = Annotated[StrictStr, Field(pattern=_GROUP_PATTERN)]
MAX_EGRESS = 32


def _egress(value: Literal["none"] | list[str] | None) -> Literal["none"] | list[str] | None:
    if isinstance(value, list):
        return [str(destination(item)) for item in value]  # its ValueError names no value
    return value


Egress = Annotated[
    Literal["none"] | Annotated[list[StrictStr], Field(min_length=1, max_length=MAX_EGRESS)],
    AfterValidator(_egress),
]


def reach_of(
    tenant: str, network_group: str | None, egress: Literal["none"] | list[str] | None
) -> Reach:
    """The driver's ``Reach`` for a VM of ``tenant`` with ``network_group`` and ``egress``."""
    group = tenant_group(tenant, network_group)
    if egress is None:
        return Reach(group)
    destinations = () if egress == "none" else tuple(destination(d) for d in egress)
    return Reach(group, destinations)


def tenant_group(tenant: str, network_group: str | None) -> str | None:
    """A ``network_group`` as the driver and placement know it: one tenant's, so that two
    tenants that choose one name never reach each other."""
    return None if network_group is None else f"{tenant}/{network_group}"


MAX_WAIT = 300.0
"""The longest ``GET /vms/{id}?wait=true`` waits, in seconds."""
StartMode = Literal["auto", "cold"]
Seconds = Annotated[StrictInt, Field(ge=0, le=10 * 365 * 86400)]
POOL_MAX_SIZE = 256


class CreateVMRequest(_Strict):
    """The body of ``POST /vms``."""

    image: ImageSpec
    cpus: Count = 2
    memory: MemoryMB = 1024
    network_type: NetworkType = "nat"
    network_group: NetworkGroup | None = None
    """The VMs created with the same group may reach each other; no other VM reaches it."""
    egress: Egress | None = None
    """On ``nat``, where beyond the host it may send: ``"none"``, or ``CIDR[:PORT]``s within
    what the host allows; left out, all the host allows."""
    headless: StrictBool = True
    callback_url: HttpUrl | None = None
    ready_when: ReadyWhen | None = None
    """Without it, a VM is ready when its IP is known."""
    name: Annotated[StrictStr, Field(json_schema_extra={"pattern": _DNS_LABEL_PATTERN})] | None = (
        None
    )
    """The guest's hostname, unique among the VMs that exist; without it, ``vm-`` and the
    first part of the VM's ID."""
    ssh_authorized_keys: Annotated[list[SSHPublicKey], Field(max_length=16)] = []
    """OpenSSH public keys for the image's default user."""
    user_data: StrictStr | None = Field(default=None, max_length=USER_DATA_MAX_BYTES)
    """cloud-init user data: a ``#cloud-config`` document or a ``#!`` script. A secret: never
    shown again, only its sha256."""
    metadata: dict[MetadataKey, StrictStr] = Field(default={}, max_length=METADATA_MAX_ENTRIES)
    """Strings the guest can read (in the NoCloud seed, QEMU's fw_cfg, VMware's guestinfo).
    Values are secrets: only the keys are shown again."""
    start: StartMode = "auto"
    """``auto``: claimed from a warm pool of the image and shape, or restored from its ready
    memory template, when there is one; ``cold``: always a cold boot."""
    labels: Labels = {}
    ttl: Seconds | None = None
    """The lease, in seconds from now: the VM is destroyed when it ends, unless renewed. Left
    out, the server's default; 0 or null, no lease, where the server allows that."""

    _callback_url = field_validator("callback_url")(_http_url)
    _name = field_validator("name")(_dns_label)

    @model_validator(mode="after")
    def _reach_fits_the_network(self) -> CreateVMRequest:
        if self.network_type == "bridged" and (self.network_group or self.egress):
            raise ValueError(
                "network_group and egress need a network goldclone owns (nat or hostonly); "
                "a bridged network is its operator's"
            )
        if isinstance(self.egress, list) and self.network_type != "nat":
            raise ValueError('egress: only nat reaches beyond the host; use "none" or leave it out')
        return self

    _user_data = field_validator("user_data")(_check_user_data)
    _metadata = field_validator("metadata")(_check_metadata)


class UpdateVMRequest(_Strict):
    """The body of ``PATCH /vms/{id}``: a field left out is left as it is."""

    ttl: Seconds | None = None
    """Renews the lease: it ends this many seconds from now (0 or null: no lease)."""
    labels: Labels | None = None
    """Replaces the VM's labels."""

    @model_validator(mode="after")
    def _something(self) -> UpdateVMRequest:
        if not self.model_fields_set:
            raise ValueError('give "ttl", "labels" or both')
        return self


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
    network_group: str | None = None
    egress: Literal["none"] | list[str] | None = None
    dropped_packets: dict[str, int] | None = None
    """What its network's rules dropped of what it sent, by reason; present while it runs, on
    the host that answers."""
    headless: bool
    callback_url: str | None
    ready_when: ReadyWhen | None = None
    name: str | None = None
    hostname: str = ""
    ssh_authorized_keys: list[str] = []
    user_data_sha256: str | None = None
    """The sha256 of the ``user_data`` given, or null; the user data itself is never shown."""
    metadata_keys: list[str] = []
    """The keys of the ``metadata`` given; its values are never shown."""
    start: StartMode = "auto"
    started_from: Literal["cold", "template", "pool"] = "cold"
    """How the machine started: a cold boot, restored from a memory template, or claimed from
    a warm pool."""
    pool: str | None = None
    """The warm pool the machine was claimed from."""
    labels: dict[str, str] = {}
    expires_at: str | None = None
    """When its lease ends and it is destroyed; null: it has none."""
    ip_address: str = ""
    mac_address: str = ""
    status: Status = Status.CREATING
    status_reason: str | None = None
    """Why the status is ``unknown`` or ``stopped``; null otherwise."""
    host: str | None = None
    """The ID of the host whose hypervisor runs it (``GET /hosts``)."""
    tenant: str = DEFAULT_TENANT
    """The tenant whose token made it, which alone (with ``admin`` tokens) sees it."""
    guest_os: str = ""
    error: ErrorBody | None = None
    created_at: str
    timeline: list[TimelineEntry] = []
    progress: DownloadProgress | None = None
    """Present while the VM waits for its image to download."""
    image_from_cache: bool | None = Field(
        default=None,
        description="Whether the gold image was in the cache when the VM needed it: true, "
        "nothing was downloaded for it and image.url was not fetched (the cache is "
        "content-addressed); false, it waited for a download; null until it has its image.",
    )


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
    checksums: dict[ChecksumType, str] = Field(
        default={},
        description="Every checksum the image is known by, type to lowercase hex: the one it "
        "was fetched by, its package's sha256, and others verified against the same package "
        "since. A request with any of them uses this image, and /images/<type>-<checksum> of "
        "any of them names it.",
    )
    url: str
    status: ImageStatus
    size_bytes: int = 0
    """Space taken on disk by the unpacked image."""
    vms: int = 0
    """How many VMs use the image; it can be deleted only when none does."""
    last_used_at: str | None = None
    """When a VM or a pool last took the image (its fetch counts as a use)."""
    progress: DownloadProgress | None = None
    error: ErrorBody | None = None
    templates: list[Template] = []
    """The image's memory templates."""
    public: bool = False
    """Whether an operator made it every tenant's (``PATCH /images/{id}``); otherwise a tenant
    sees and uses it once it has shown it has it."""


class ImageChange(_Strict):
    """The body of ``PATCH /images/{id}``."""

    public: bool
    """Make the image every tenant's, or only theirs that showed they have it."""


class TemplateRequest(_Strict):
    """The body of ``POST /images/{id}/templates``: the shape of the machines the template is
    for, and what "ready" means before it is saved."""

    cpus: Count = 2
    memory: MemoryMB = 1024
    ready_when: ReadyWhen | None = None


class TemplateStatus(StrEnum):
    CREATING = "creating"
    READY = "ready"
    ERROR = "error"


class Template(BaseModel):
    """A memory template: a booted, ready guest of one gold image and shape, saved once; VMs
    of that image and shape start from it instead of booting."""

    id: str
    image_id: str
    cpus: int
    memory: int
    ready_when: ReadyWhen | None = None
    status: TemplateStatus = TemplateStatus.CREATING
    size_bytes: int = 0
    """Space taken on disk by its RAM, device state and disk."""
    error: ErrorBody | None = None
    created_at: str


class ImageList(BaseModel):
    images: list[Image]


class PoolRequest(_Strict):
    """The body of ``PUT /pools/{name}``: the image and shape of the VMs that the pool keeps
    running, and how many."""

    image: ImageSpec
    cpus: Count = 2
    memory: MemoryMB = 1024
    network_type: NetworkType = "nat"
    size: Annotated[Count, Field(ge=0, le=POOL_MAX_SIZE)] = 1


class PoolStatus(StrEnum):
    FILLING = "filling"
    """Fewer VMs are ready than the pool's size; more are being restored."""
    READY = "ready"
    ERROR = "error"
    """The pool cannot be filled (its image or template failed); ``error`` says why."""


class Pool(BaseModel):
    """A warm pool: ``size`` VMs of one image and shape kept restored and running, each
    claimed by the next ``POST /vms`` of that image and shape."""

    name: str
    image: ImageSpec
    cpus: int
    memory: int
    network_type: NetworkType
    size: int
    status: PoolStatus = PoolStatus.FILLING
    ready: int = 0
    """VMs waiting to be claimed."""
    filling: int = 0
    """VMs being restored."""
    claimed: int = 0
    """VMs claimed from the pool since it was made."""
    error: ErrorBody | None = None
    created_at: str


class HostState(StrEnum):
    UP = "up"
    LOST = "lost"


class Resources(BaseModel):
    """VMs, vCPUs and MB of memory; null where the host sets no total."""

    vms: int | None
    cpus: int | None
    memory: int | None


class Host(BaseModel):
    """A service on the shared database, as ``GET /hosts`` shows it."""

    id: str
    name: str
    """The machine's hostname."""
    state: HostState
    """``lost`` once no heartbeat came for ``GOLDCLONE_HOST_LOST_AFTER`` seconds."""
    started_at: str
    heartbeat_at: str
    driver: str
    network_types: list[str]
    capacity: Resources
    """The totals the host admits VMs to (``GOLDCLONE_MAX_VMS``, ...)."""
    used: Resources
    """What its VMs and warm pools' machines hold."""
    free: Resources
    machine: Resources
    """The machine's own CPUs and memory, for reference."""
    images: list[str] = []
    """The gold images it holds, by ID."""


class HostList(BaseModel):
    hosts: list[Host]


class PoolList(BaseModel):
    pools: list[Pool]


def now_ms() -> str:
    """The current UTC time as RFC 3339 with milliseconds, e.g. ``2026-11-26T18:25:40.123Z``."""
    return _utc_now("milliseconds")


def in_ms(seconds: float) -> str:
    """``now_ms`` of ``seconds`` from now."""
    return rfc3339_ms(datetime.now(UTC) + timedelta(seconds=seconds))


def parse_time(stamp: str) -> datetime:
    """A time as ``now_ms`` and ``now_s`` write it."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def seconds_between(start: str, end: str) -> float:
    """Seconds from one ``now_ms`` time to a later one."""
    return (parse_time(end) - parse_time(start)).total_seconds()


def seconds_until(stamp: str) -> float:
    """Seconds from now until ``stamp`` (negative once it has passed)."""
    return (parse_time(stamp) - datetime.now(UTC)).total_seconds()


def rfc3339_ms(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now_s() -> str:
    """The current UTC time as RFC 3339 in whole seconds, e.g. ``2026-11-26T18:25:40Z``."""
    return _utc_now("seconds")


def _utc_now(timespec: str) -> str:
    return datetime.now(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")
