"""The API's data: request bodies and the VM object, shared by the server and its clients."""

from __future__ import annotations

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

from goldclone.access import DEFAULT_TENANT
from goldclone.clock import Moment, Second
from goldclone.fields import (
    DNS_LABEL_PATTERN,
    METADATA_MAX_ENTRIES,
    USER_DATA_MAX_BYTES,
    ChecksumType,
    Count,
    DiskSizeGiB,
    Egress,
    HttpUrl,
    MemoryMB,
    MetadataKey,
    NetworkGroup,
    NetworkType,
    OciReference,
    Port,
    SSHPublicKey,
    StrictTrue,
    check_metadata,
    check_user_data,
    dns_label,
    http_url,
    oci_reference,
)
from goldclone.image_spec import ImageSpec
from goldclone.labels import Labels


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


MAX_WAIT = 300.0
"""The longest ``GET /vms/{id}?wait=true`` waits, in seconds."""
StartMode = Literal["auto", "cold"]
OnPoweroff = Literal["stop", "delete"]
Seconds = Annotated[StrictInt, Field(ge=0, le=10 * 365 * 86400)]
POOL_MAX_SIZE = 256


class CreateVMRequest(_Strict):
    """The body of ``POST /vms``."""

    image: ImageSpec
    cpus: Count = 2
    memory: MemoryMB = 1024
    disk_size: DiskSizeGiB | None = None
    """The clone's disk grown to this many GiB (never shrunk: below the image's size is a
    400), which a cloud-init guest's root fills at first boot; left out, the image's size."""
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
    name: Annotated[StrictStr, Field(json_schema_extra={"pattern": DNS_LABEL_PATTERN})] | None = (
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
    on_poweroff: OnPoweroff = "stop"
    """When the guest powers itself off: ``stop`` keeps the VM, ``stopped``, until it is
    deleted; ``delete`` deletes it as ``DELETE`` would, and tells its callback, so that a CI
    job's last step can be ``poweroff``."""
    labels: Labels = {}
    ttl: Seconds | None = None
    """The lease, in seconds from now: the VM is destroyed when it ends, unless renewed. Left
    out, the server's default; 0 or null, no lease, where the server allows that."""

    _callback_url = field_validator("callback_url")(http_url)
    _name = field_validator("name")(dns_label)

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

    _user_data = field_validator("user_data")(check_user_data)
    _metadata = field_validator("metadata")(check_metadata)


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
    at: Moment


class VM(BaseModel):
    """The VM object that GET returns and the callback carries."""

    id: str
    image: ImageSpec
    cpus: int
    memory: int
    disk_size: int | None = None
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
    on_poweroff: OnPoweroff = "stop"
    started_from: Literal["cold", "template", "pool"] = "cold"
    """How the machine started: a cold boot, restored from a memory template, or claimed from
    a warm pool."""
    pool: str | None = None
    """The warm pool the machine was claimed from."""
    labels: dict[str, str] = {}
    expires_at: Moment | None = None
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
    created_at: Second
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
    """The URL it was first fetched from; empty for an image pulled from a registry."""
    oci: str | None = None
    """The registry reference it was first pulled by, pinned to its manifest's digest (a tag
    is resolved once per pull)."""
    name: str | None = None
    """The name it was given when it was made from a VM."""
    disk_sha256: str | None = None
    """The sha256 of its disk: what the image is, whatever package or registry format carried
    it (none for a VMware VM, known by its package alone)."""
    status: ImageStatus
    size_bytes: int = 0
    """Space taken on disk by the unpacked image."""
    vms: int = 0
    """How many VMs use the image; it can be deleted only when none does."""
    last_used_at: Moment | None = None
    """When a VM or a pool last took the image (its fetch counts as a use)."""
    progress: DownloadProgress | None = None
    error: ErrorBody | None = None
    templates: list[Template] = []
    """The image's memory templates."""
    public: bool = False
    """Whether an operator made it every tenant's (``PATCH /images/{id}``); otherwise a tenant
    sees and uses it once it has shown it has it."""


class ImageBuild(_Strict):
    """The body of ``POST /vms/{id}/image``: the new gold image's name, and where to push it."""

    name: Annotated[StrictStr, Field(min_length=1, max_length=128, pattern=r"^[ -~]+$")]
    push: OciReference | None = None
    """A registry reference with a tag, to push the image to as goldclone's disk artifact."""
    chunk_mb: Annotated[Count, Field(ge=1, le=512)] = 64
    """The artifact's chunk size, in MiB."""

    _push = field_validator("push")(oci_reference)


class ImagePush(_Strict):
    """The body of ``POST /images/{id}/push``."""

    oci: OciReference
    """A registry reference with a tag."""
    chunk_mb: Annotated[Count, Field(ge=1, le=512)] = 64

    _oci = field_validator("oci")(oci_reference)


class Pushed(BaseModel):
    """Where an image was pushed: the reference pinned to the manifest's digest."""

    image_id: str
    oci: str


class ImageChange(_Strict):
    """The body of ``PATCH /images/{id}``."""

    public: bool
    """Make the image every tenant's, or only theirs that showed they have it."""


class TemplateRequest(_Strict):
    """The body of ``POST /images/{id}/templates``: the shape of the machines the template is
    for, and what "ready" means before it is saved."""

    cpus: Count = 2
    memory: MemoryMB = 1024
    disk_size: DiskSizeGiB | None = None
    """Its disk in GiB, grown before its first boot; left out, the image's size."""
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
    disk_size: int | None = None
    ready_when: ReadyWhen | None = None
    status: TemplateStatus = TemplateStatus.CREATING
    size_bytes: int = 0
    """Space taken on disk by its RAM, device state and disk."""
    error: ErrorBody | None = None
    created_at: Second


class ImageList(BaseModel):
    images: list[Image]


class TemplateList(BaseModel):
    templates: list[Template]


class PoolRequest(_Strict):
    """The body of ``PUT /pools/{name}``: the image and shape of the VMs that the pool keeps
    running, and how many."""

    image: ImageSpec
    cpus: Count = 2
    memory: MemoryMB = 1024
    disk_size: DiskSizeGiB | None = None
    """Its machines' disk in GiB, as on ``POST /vms``; part of the shape a create must ask
    for to claim one."""
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
    disk_size: int | None = None
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
    created_at: Second


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
    started_at: Moment
    heartbeat_at: Moment
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
    """The gold images it holds that the reader's tenant sees, by ID."""
    url: str | None = None
    """Where other hosts reach its API (``GOLDCLONE_ADVERTISE_URL``), to relay to it."""


class HostList(BaseModel):
    hosts: list[Host]


class PoolList(BaseModel):
    pools: list[Pool]
