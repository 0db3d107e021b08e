"""Pushing a disk to a registry as goldclone's disk artifact: each chunk cut and compressed in
a worker thread, one at a time (a chunk is the most held in memory), and uploaded unless the
repository has it already, so a new version of a disk sends only the chunks that changed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

from goldclone.images.oci.disk_artifact import (
    Chunk,
    DiskConfig,
    config_descriptor,
    cut,
    manifest_json,
)
from goldclone.images.oci.manifests import OCI_MANIFEST, Descriptor
from goldclone.images.oci.registry import Registry
from goldclone.references import Reference


async def push_disk(
    registry: Registry, ref: Reference, disk: Path, disk_format: str, chunk_size: int
) -> tuple[str, list[Chunk]]:
    """``disk`` pushed under ``ref``'s tag: the manifest's digest, and the chunks it has."""
    parts: Iterator[tuple[bytes, Chunk] | DiskConfig] = cut(disk, disk_format, chunk_size)
    chunks: list[Chunk] = []
    while isinstance(part := await asyncio.to_thread(next, parts), tuple):
        packed, chunk = part
        if not await registry.has_blob(ref, chunk.layer.digest):
            await registry.push_blob(ref, chunk.layer.digest, packed)
        chunks.append(chunk)
    config: DiskConfig = part
    described = config_descriptor(config)
    if not await registry.has_blob(ref, described.digest):
        await registry.push_blob(ref, described.digest, config.to_json())
    layers: list[Descriptor] = [chunk.layer for chunk in chunks]
    digest = await registry.push_manifest(ref, manifest_json(described, layers), OCI_MANIFEST)
    return digest, chunks
