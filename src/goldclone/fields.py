"""The fields of the API's requests: their types, and the rules that check them (URLs,
checksums, DNS labels, SSH public keys, user data and metadata, network groups and egress),
each raising ``ValueError`` with a reason that never repeats the value."""

from __future__ import annotations

import base64
import binascii
import re
import struct
from typing import Annotated, Literal

import httpx
from pydantic import AfterValidator, Field, JsonValue, StrictBool, StrictInt, StrictStr

from goldclone import references
from goldclone.egress import destination

ChecksumType = Literal["md5", "sha1", "sha256", "sha512"]
NetworkType = Literal["bridged", "nat", "hostonly"]

CHECKSUM_HEX_LENGTH: dict[str, int] = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}
HEX = re.compile(r"[0-9a-fA-F]+")
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


def http_url(url: str | None) -> str | None:
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


def checksum_variants() -> list[JsonValue]:
    """An image names its source one way (a URL and its checksum, whose length depends on
    its type; a registry reference; a gold image's ID); this says so in the JSON schema."""

    def hex_of(length: int) -> JsonValue:
        return {"type": "string", "pattern": f"^[0-9a-fA-F]{{{length}}}$"}

    no_oci: JsonValue = {"required": ["oci"]}
    no_id: JsonValue = {"required": ["id"]}
    variants: list[JsonValue] = [
        {"properties": {"checksum_type": {"const": kind}, "checksum": hex_of(length)},
         "required": ["url", "checksum", "checksum_type"], "not": {"anyOf": [no_oci, no_id]}}
        for kind, length in CHECKSUM_HEX_LENGTH.items()
    ]  # fmt: skip
    no_type: JsonValue = {"required": ["checksum_type"]}
    variants.append(
        {"properties": {"checksum": hex_of(CHECKSUM_HEX_LENGTH["sha256"])},
         "required": ["url", "checksum"], "not": {"anyOf": [no_type, no_oci, no_id]}}
    )  # fmt: skip
    url_fields: list[JsonValue] = [
        {"required": [name]} for name in ("url", "checksum", "checksum_type")
    ]
    variants.append(
        {"properties": {"oci": {"type": "string"}}, "required": ["oci"],
         "not": {"anyOf": [*url_fields, no_id]}}
    )  # fmt: skip
    variants.append(
        {"properties": {"id": {"type": "string"}}, "required": ["id"],
         "not": {"anyOf": [*url_fields, no_oci]}}
    )  # fmt: skip
    return variants


def oci_reference(text: str | None) -> str | None:
    if text is not None:
        references.parse(text)
    return text


IMAGE_ID_PATTERN = "^(md5|sha1|sha256|sha512)-[0-9a-f]{32,128}$"
ImageId = Annotated[StrictStr, Field(max_length=140, pattern=IMAGE_ID_PATTERN)]
"""A gold image's ID, ``<type>-<lowercase hex>``."""

OciReference = Annotated[
    StrictStr,
    Field(max_length=references.MAX_LENGTH, json_schema_extra={"pattern": references.PATTERN}),
]


Count = StrictInt
"""A whole number, as JSON writes one: ``2.0``, ``"2"`` and ``true`` are not counts."""
Port = Annotated[StrictInt, Field(ge=1, le=65535)]
MIN_MEMORY_MB = 128
"""The least memory a VM, template or pool machine may have. The demo guest boots with 80 MB
under QEMU (with less, its kernel runs out of memory unpacking its initramfs, and panics);
this leaves room for a larger kernel. A host may ask for more (``Limits.min_memory_mb``)."""
MemoryMB = Annotated[Count, Field(ge=MIN_MEMORY_MB, description="Megabytes.")]
MAX_DISK_GIB = 16384
DiskSizeGiB = Annotated[Count, Field(ge=1, le=MAX_DISK_GIB, description="GiB (2^30 bytes).")]


def _true(value: bool) -> bool:
    if not value:
        raise ValueError("must be true, or left out")
    return value


StrictTrue = Annotated[StrictBool, AfterValidator(_true), Field(json_schema_extra={"const": True})]
"""``true`` itself: ``Literal[True]`` takes ``1`` and ``1.0`` too."""


DNS_LABEL_PATTERN = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
_DNS_LABEL = re.compile(DNS_LABEL_PATTERN)


def is_dns_label(name: str) -> bool:
    return _DNS_LABEL.fullmatch(name) is not None


def dns_label(name: str | None) -> str | None:
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


def check_user_data(user_data: str | None) -> str | None:
    if user_data is None:
        return None
    if (size := len(user_data.encode())) > USER_DATA_MAX_BYTES:
        raise ValueError(f"is {size} bytes; at most {USER_DATA_MAX_BYTES} are allowed")
    if not user_data.startswith(("#cloud-config", "#!")):
        raise ValueError("must be a #cloud-config document or a #! script")
    return user_data


def check_metadata(metadata: dict[str, str]) -> dict[str, str]:
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
