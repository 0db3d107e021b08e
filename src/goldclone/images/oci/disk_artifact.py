"""goldclone's own disk artifact: a disk cut into fixed-size chunks, each a layer of an OCI
image manifest, compressed on its own and deterministically (gzip, level 6, no name or time),
so that the same bytes always give the same layer, and a new version of a disk shares every
unchanged chunk with the last.

The config (``DISK_CONFIG``) says what the chunks make: ``{"format": "qcow2"|"raw",
"size": BYTES, "chunk_size": BYTES, "sha256": HEX}`` (the whole disk's sha256, which is the
gold image's identity). Each layer (``DISK_CHUNK``) carries the sha256 of its uncompressed
bytes in the annotation ``org.goldclone.chunk.sha256``; the last chunk may be shorter.
Everything here is synchronous; the service runs it in worker threads.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from goldclone.errors import ChecksumMismatch, ImageUnsupported
from goldclone.images.oci.manifests import (
    DISK_CHUNK,
    DISK_CONFIG,
    OCI_MANIFEST,
    Descriptor,
    Manifest,
)

CHUNK_ANNOTATION = "org.goldclone.chunk.sha256"
DEFAULT_CHUNK_SIZE = 64 << 20
MIN_CHUNK_SIZE = 1 << 20
MAX_CHUNK_SIZE = 512 << 20
FORMATS = ("qcow2", "raw")
_BLOCK = 1 << 20


@dataclass(frozen=True)
class DiskConfig:
    format: str
    size: int
    chunk_size: int
    sha256: str

    def to_json(self) -> bytes:
        fields = {
            "format": self.format,
            "size": self.size,
            "chunk_size": self.chunk_size,
            "sha256": self.sha256,
        }
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    @property
    def chunk_count(self) -> int:
        return max(1, -(-self.size // self.chunk_size))


@dataclass(frozen=True)
class Chunk:
    """One chunk of a disk: its layer, and the sha256 of its bytes."""

    layer: Descriptor
    sha256: str
    offset: int
    length: int


def read_config(body: bytes) -> DiskConfig:
    try:
        found: Any = json.loads(body)
        config = DiskConfig(
            str(found["format"]), int(found["size"]), int(found["chunk_size"]), str(found["sha256"])
        )
    except (ValueError, KeyError, TypeError):
        raise ImageUnsupported("the disk artifact's config is not goldclone's") from None
    if config.format not in FORMATS:
        raise ImageUnsupported(
            f"the disk artifact's disk is of format {config.format!r}, "
            f"not one of {', '.join(FORMATS)}"
        )
    if not MIN_CHUNK_SIZE <= config.chunk_size <= MAX_CHUNK_SIZE or config.size <= 0:
        raise ImageUnsupported("the disk artifact's sizes are out of range")
    if len(config.sha256) != 64:
        raise ImageUnsupported("the disk artifact's config has no sha256 of its disk")
    return config


def chunks_of(manifest: Manifest, config: DiskConfig) -> list[Chunk]:
    """The chunks a manifest's layers are, checked against its config."""
    if len(manifest.layers) != config.chunk_count:
        raise ImageUnsupported(
            f"the disk artifact has {len(manifest.layers)} layers for {config.chunk_count} chunks"
        )
    found = []
    for n, layer in enumerate(manifest.layers):
        sha256 = layer.annotations.get(CHUNK_ANNOTATION, "")
        if layer.media_type != DISK_CHUNK or len(sha256) != 64:
            raise ImageUnsupported(f"layer {n} of the disk artifact is not one of its chunks")
        offset = n * config.chunk_size
        found.append(Chunk(layer, sha256, offset, min(config.chunk_size, config.size - offset)))
    return found


def write_chunk(disk: BinaryIO, chunk: Chunk, source: BinaryIO, compressed: bool) -> None:
    """Write one chunk into ``disk`` at its offset from ``source`` (its layer's blob, or the
    same chunk of a local disk), checked against the chunk's sha256 as it is written; blocks
    of zeros are skipped, so a sparse disk stays sparse."""
    reader = _Inflater(source) if compressed else source
    digest = hashlib.sha256()
    done = 0
    disk.seek(chunk.offset)
    while done < chunk.length:
        block = reader.read(min(_BLOCK, chunk.length - done))
        if not block:
            break
        digest.update(block)
        if block.count(0) == len(block):
            disk.seek(len(block), 1)
        else:
            disk.write(block)
        done += len(block)
    if done != chunk.length or (compressed and reader.read(1)):
        raise ChecksumMismatch(
            f"the chunk at offset {chunk.offset} of the disk artifact is not {chunk.length} bytes "
            f"long"
        )
    if digest.hexdigest() != chunk.sha256:
        raise ChecksumMismatch(
            f"the chunk at offset {chunk.offset} of the disk artifact has other bytes than its "
            f"sha256"
        )


class _Inflater:
    """A gzip stream read in bounded pieces (a bomb stops at what the chunk may hold)."""

    def __init__(self, source: BinaryIO) -> None:
        self._file = gzip.GzipFile(fileobj=source, mode="rb")

    def read(self, size: int) -> bytes:
        try:
            return self._file.read(size)
        except (OSError, EOFError, zlib.error):
            raise ImageUnsupported("a chunk of the disk artifact is not a gzip stream") from None


def cut(
    disk: Path, disk_format: str, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[tuple[bytes, Chunk] | DiskConfig]:
    """A disk cut into its artifact: each chunk's compressed bytes with its ``Chunk``, then
    the config. The same bytes always give the same layers."""
    whole = hashlib.sha256()
    size = disk.stat().st_size
    with disk.open("rb") as f:
        for offset in range(0, max(size, 1), chunk_size):
            data = f.read(chunk_size)
            whole.update(data)
            packed = gzip.compress(data, compresslevel=6, mtime=0)
            layer = Descriptor(
                DISK_CHUNK, "sha256:" + hashlib.sha256(packed).hexdigest(), len(packed),
                {CHUNK_ANNOTATION: hashlib.sha256(data).hexdigest()},
            )  # fmt: skip
            yield packed, Chunk(layer, layer.annotations[CHUNK_ANNOTATION], offset, len(data))
    yield DiskConfig(disk_format, size, chunk_size, whole.hexdigest())


def manifest_json(config: Descriptor, layers: list[Descriptor]) -> bytes:
    """An OCI image manifest of a disk artifact, its bytes as they are pushed."""

    def described(d: Descriptor) -> dict[str, Any]:
        return {"mediaType": d.media_type, "digest": d.digest, "size": d.size} | (
            {"annotations": d.annotations} if d.annotations else {}
        )

    body = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": described(config),
        "layers": [described(d) for d in layers],
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def config_descriptor(config: DiskConfig) -> Descriptor:
    body = config.to_json()
    return Descriptor(DISK_CONFIG, "sha256:" + hashlib.sha256(body).hexdigest(), len(body))
