"""The manifests goldclone reads: an OCI image manifest or Docker's schema 2 one (an index or
manifest list names one of them, for linux/amd64), and which of the two disk formats a
manifest carries."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from goldclone.errors import ImageUnsupported

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
ACCEPTED = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
INDEXES = (OCI_INDEX, DOCKER_LIST)

TAR_LAYERS = {
    "application/vnd.oci.image.layer.v1.tar": False,
    "application/vnd.oci.image.layer.v1.tar+gzip": True,
    "application/vnd.docker.image.rootfs.diff.tar": False,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": True,
}
"""The layer types of a containerDisk, and whether each is gzip-compressed."""

DISK_CONFIG = "application/vnd.goldclone.disk.config.v1+json"
"""The config of goldclone's disk artifact (``images/oci/disk_artifact.py``)."""
DISK_CHUNK = "application/vnd.goldclone.disk.chunk.v1.gzip"
MAX_MANIFEST = 4 << 20
"""The largest manifest read: Distribution's own limit."""


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    digest: str
    """``sha256:<hex>`` of the manifest's bytes, as the registry served them."""
    config: Descriptor
    layers: list[Descriptor]

    @property
    def is_disk_artifact(self) -> bool:
        return self.config.media_type == DISK_CONFIG


def descriptor(value: Any, what: str) -> Descriptor:
    try:
        digest, size = value["digest"], value["size"]
        media_type = value.get("mediaType", "")
        annotations = value.get("annotations") or {}
    except (TypeError, KeyError, AttributeError):
        raise ImageUnsupported(f"the manifest's {what} is not a descriptor") from None
    if not (isinstance(digest, str) and digest.startswith("sha256:") and len(digest) == 71):
        raise ImageUnsupported(
            f"the manifest's {what} has a digest of another algorithm than sha256"
        )
    if not isinstance(size, int) or size < 0:
        raise ImageUnsupported(f"the manifest's {what} has no valid size")
    return Descriptor(
        str(media_type), digest, size, {str(k): str(v) for k, v in annotations.items()}
    )


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        found = json.loads(body)
    except ValueError:
        raise ImageUnsupported("the registry's manifest is not JSON") from None
    if not isinstance(found, dict):
        raise ImageUnsupported("the registry's manifest is not a JSON object")
    return found


def pick_platform(index: dict[str, Any]) -> Descriptor:
    """The manifest of an index for linux/amd64, or its only one."""
    entries = index.get("manifests")
    if not isinstance(entries, list) or not entries:
        raise ImageUnsupported("the registry's index names no manifest")
    for entry in entries:
        platform = entry.get("platform") or {} if isinstance(entry, dict) else {}
        if platform.get("os") == "linux" and platform.get("architecture") == "amd64":
            return descriptor(entry, "linux/amd64 manifest")
    if len(entries) == 1:
        return descriptor(entries[0], "only manifest")
    raise ImageUnsupported("the registry's index has no manifest for linux/amd64")


def parse_manifest(digest: str, body: dict[str, Any]) -> Manifest:
    layers = body.get("layers")
    if not isinstance(layers, list):
        raise ImageUnsupported("the registry's manifest has no layers")
    return Manifest(
        digest,
        descriptor(body.get("config"), "config"),
        [descriptor(layer, f"layer {n}") for n, layer in enumerate(layers)],
    )
