"""Pulling a disk from a registry into a gold image's staging folder.

Blobs are fetched to ``downloads/blob-<hex>.part``, hashed as they arrive and checked against
their digest, then renamed without ``.part``; a fetch that stopped is resumed from the bytes it
has (an HTTP range) by the next pull of the same blob, while the service runs. One fetch per
blob at a time, whichever pulls want it. A disk artifact's chunk that a gold image on this
host already has is copied from that image's disk (checked against its sha256), not fetched.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import httpx

from goldclone.errors import ChecksumMismatch, DownloadFailed, ImageUnsupported
from goldclone.images.checks import inspect_package
from goldclone.images.damage import read_as_package
from goldclone.images.download import CHUNK, Sink, check_room, to_the_end
from goldclone.images.gold import file_sha256, remove
from goldclone.images.oci.disk_artifact import (
    Chunk,
    DiskConfig,
    chunks_of,
    read_config,
    write_chunk,
)
from goldclone.images.oci.manifests import TAR_LAYERS, Descriptor, Manifest
from goldclone.images.oci.registry import Registry
from goldclone.images.oci.stream import Aborted, BlobStream, in_own_thread
from goldclone.images.unpack import UnpackLimits
from goldclone.images.unpack.sources import open_source
from goldclone.images.unpack.tar_archive import unpack_tar
from goldclone.images.unpack.writer import Writer
from goldclone.models import DownloadProgress
from goldclone.references import Reference, digest_hex

log = logging.getLogger(__name__)

MAX_CONFIG = 1 << 20
PARALLEL_BLOBS = 4


@dataclass(frozen=True)
class LocalChunk:
    """A chunk of a disk artifact that a gold image here has: its disk and where."""

    disk: Path
    offset: int


@dataclass(frozen=True)
class Pulled:
    disk: Path
    format: str
    disk_sha256: str
    chunks: dict[str, object] | None
    """A disk artifact's chunks, kept in ``gold.json`` so that later pulls reuse them."""


class Puller:
    def __init__(self, registry: Registry, folder: Path, limits: UnpackLimits) -> None:
        self.registry = registry
        self._folder = folder
        self._limits = limits
        self._blobs: dict[str, asyncio.Task[tuple[Path, bool]]] = {}

    async def pull(
        self,
        ref: Reference,
        manifest: Manifest,
        staging: Path,
        reserve: int,
        progress: Callable[[DownloadProgress], None],
        local: Callable[[str], LocalChunk | None],
    ) -> Pulled:
        """The disk that ``manifest`` (of ``ref``) carries, made in ``staging/content``."""
        content = staging / "content"
        content.mkdir()
        if manifest.is_disk_artifact:
            return await self._artifact(ref, manifest, content, reserve, progress, local)
        return await self._container_disk(ref, manifest, content, reserve, progress)

    async def _container_disk(
        self, ref: Reference, manifest: Manifest, content: Path, reserve: int,
        progress: Callable[[DownloadProgress], None],
    ) -> Pulled:  # fmt: skip
        if len(manifest.layers) != 1 or manifest.layers[0].media_type not in TAR_LAYERS:
            raise ImageUnsupported(
                f"{ref} is neither goldclone's disk artifact nor a containerDisk (one tar layer "
                "with the disk under /disk/)"
            )
        (layer,) = manifest.layers
        shown = DownloadProgress(bytes_done=0, bytes_total=layer.size)
        progress(shown)
        await asyncio.to_thread(
            check_room, f"layer {layer.digest} of {ref}", self._folder, 2 * layer.size, reserve
        )
        writer = Writer(content, self._limits, hashed=True)
        blob = await self._stream_layer(ref, layer, shown, writer, TAR_LAYERS[layer.media_type])
        if blob is not None:  # not unpacked as it came: from the file, then
            writer = Writer(content, self._limits, hashed=True)
            try:
                await asyncio.to_thread(_unpack_file, blob, writer, TAR_LAYERS[layer.media_type])
            finally:
                await asyncio.to_thread(remove, blob)
        if not (content / "disk").is_dir():
            raise ImageUnsupported(f"the layer of {ref} holds no disk image under /disk/")
        package = await asyncio.to_thread(inspect_package, content / "disk")
        if package.vmx is not None:
            raise ImageUnsupported(f"the layer of {ref} holds a VMware VM, not a disk")
        assert writer.sha256 is not None
        sha256 = writer.sha256[package.disk.path]
        return Pulled(package.disk.path, package.disk.format, sha256, None)

    async def _stream_layer(
        self, ref: Reference, layer: Descriptor, shown: DownloadProgress, writer: Writer,
        gzip: bool,
    ) -> Path | None:  # fmt: skip
        """Unpack ``layer`` with ``writer`` as it downloads; its blob if that could not be
        done (the blob was there already, or resumed, or another pull fetches it)."""
        stream = BlobStream()
        unpacking = asyncio.ensure_future(
            in_own_thread(lambda: _unpack_stream(stream, writer, gzip), f"unpack {layer.digest}")
        )
        try:
            blob, streamed = await self.blob(ref, layer, shown, stream.feed)
        except BaseException:
            stream.finish(complete=False)
            await asyncio.gather(unpacking, return_exceptions=True)
            raise
        stream.finish(complete=streamed)
        try:
            await unpacking
        except Aborted:
            await asyncio.to_thread(_empty, writer)
            return blob
        except BaseException:
            await asyncio.to_thread(remove, blob)
            raise
        await asyncio.to_thread(remove, blob)
        return None

    async def _artifact(
        self, ref: Reference, manifest: Manifest, content: Path, reserve: int,
        progress: Callable[[DownloadProgress], None], local: Callable[[str], LocalChunk | None],
    ) -> Pulled:  # fmt: skip
        config = read_config(await self._small_blob(ref, manifest.config))
        chunks = chunks_of(manifest, config)
        here = {
            chunk.layer.digest: found for chunk in chunks if (found := local(chunk.layer.digest))
        }
        wanted = {c.layer.digest: c.layer for c in chunks if c.layer.digest not in here}
        shown = DownloadProgress(bytes_done=0, bytes_total=sum(d.size for d in wanted.values()))
        progress(shown)
        needed = shown.bytes_total or 0
        await asyncio.to_thread(
            check_room, f"disk artifact {ref}", self._folder, needed + config.size, reserve
        )
        limit = asyncio.Semaphore(PARALLEL_BLOBS)

        async def fetch(layer: Descriptor) -> tuple[str, Path]:
            async with limit:
                return layer.digest, (await self.blob(ref, layer, shown))[0]

        blobs = dict(await asyncio.gather(*(fetch(layer) for layer in wanted.values())))
        disk = content / f"disk.{config.format}"
        try:
            await asyncio.to_thread(_assemble, disk, config, chunks, blobs, here)
        finally:
            for blob in blobs.values():
                await asyncio.to_thread(remove, blob)
        package = await asyncio.to_thread(inspect_package, content)
        if package.disk.format != config.format:
            raise ImageUnsupported(
                f"the disk of {ref} is {package.disk.format}, not the {config.format} its config "
                f"says"
            )
        kept = {"size": config.chunk_size, "layers": [[c.layer.digest, c.sha256] for c in chunks]}
        log.info(
            "%s: %d of %d chunks fetched, %d found on this host",
            ref,
            len(wanted),
            len(chunks),
            len(here),
        )
        return Pulled(disk, config.format, config.sha256, kept)

    async def _small_blob(self, ref: Reference, layer: Descriptor) -> bytes:
        if layer.size > MAX_CONFIG:
            raise ImageUnsupported(f"the config of {ref} is over {MAX_CONFIG} bytes")
        path, _ = await self.blob(ref, layer, DownloadProgress(bytes_done=0, bytes_total=None))
        try:
            return await asyncio.to_thread(path.read_bytes)
        finally:
            await asyncio.to_thread(remove, path)

    async def blob(
        self, ref: Reference, layer: Descriptor, progress: DownloadProgress,
        tap: Callable[[bytes], None] | None = None,
    ) -> tuple[Path, bool]:  # fmt: skip
        """The blob ``layer`` of ``ref``, complete and checked: its one fetch, shared; and
        whether ``tap`` was handed every byte of it, in order, as it arrived."""
        task = self._blobs.get(layer.digest)
        mine = task is None
        if task is None:
            task = asyncio.create_task(self._fetch_blob(ref, layer, progress, tap))
            self._blobs[layer.digest] = task
            task.add_done_callback(lambda _: self._blobs.pop(layer.digest, None))
        path, tapped = await asyncio.shield(task)
        return path, tapped and mine

    async def _fetch_blob(
        self, ref: Reference, layer: Descriptor, progress: DownloadProgress,
        tap: Callable[[bytes], None] | None,
    ) -> tuple[Path, bool]:  # fmt: skip
        done = self._folder / f"blob-{digest_hex(layer.digest)}"
        part = done.with_name(done.name + ".part")
        if done.exists():  # checked when it was renamed so
            return done, False
        digest = hashlib.sha256()
        offset = await asyncio.to_thread(_hash_into, part, digest, layer.size)
        tapped = False
        progress.bytes_done += offset
        if offset < layer.size:
            async with self.registry.blob(ref, layer.digest, offset) as response:
                if response.status_code == 200 and offset:  # the registry ignored the range
                    progress.bytes_done -= offset
                    offset, digest = 0, hashlib.sha256()
                    await asyncio.to_thread(part.unlink, missing_ok=True)
                tapped = offset == 0 and tap is not None
                sink = Sink(part, (digest,), append=True, tap=tap if tapped else None)
                try:
                    async for block in response.aiter_raw(CHUNK):
                        offset += len(block)
                        if offset > layer.size:
                            raise ChecksumMismatch(
                                f"blob {layer.digest} of {ref} is longer than its descriptor's "
                                f"{layer.size} bytes"
                            )
                        await to_the_end(sink.write, block)
                        progress.bytes_done += len(block)
                except httpx.HTTPError as exc:
                    raise DownloadFailed(
                        f"registry {ref.registry} failed in blob {layer.digest}: "
                        f"{exc or type(exc).__name__}"
                    ) from None
                finally:
                    await to_the_end(sink.close)
        if offset != layer.size:
            raise DownloadFailed(
                f"registry {ref.registry} ended blob {layer.digest} after {offset} of "
                f"{layer.size} bytes"
            )
        if "sha256:" + digest.hexdigest() != layer.digest:
            await asyncio.to_thread(remove, part)
            raise ChecksumMismatch(
                f"blob {layer.digest} of {ref} has other content than its digest says"
            )
        await asyncio.to_thread(part.rename, done)
        return done, tapped


def _hash_into(part: Path, digest: hashlib._Hash, size: int) -> int:
    """Feed what a stopped fetch left to ``digest``; its length (0 when there is none, or
    when it is longer than the blob)."""
    try:
        with part.open("rb") as f:
            length = 0
            while block := f.read(CHUNK):
                digest.update(block)
                length += len(block)
    except FileNotFoundError:
        return 0
    if length > size:
        part.unlink()
        return 0
    return length


def _assemble(
    disk: Path,
    config: DiskConfig,
    chunks: list[Chunk],
    blobs: dict[str, Path],
    here: dict[str, LocalChunk],
) -> None:
    with disk.open("wb") as out:
        out.truncate(config.size)
        for chunk in chunks:
            if (blob := blobs.get(chunk.layer.digest)) is not None:
                with blob.open("rb") as source:
                    write_chunk(out, chunk, source, compressed=True)
            else:
                found = here[chunk.layer.digest]
                with found.disk.open("rb") as source:
                    source.seek(found.offset)
                    write_chunk(out, chunk, source, compressed=False)
    if file_sha256(disk) != config.sha256:
        raise ChecksumMismatch(
            "the disk artifact's chunks make a disk of another sha256 than its config says"
        )


def _unpack_stream(stream: BlobStream, writer: Writer, gzip: bool) -> None:
    """A containerDisk's tar layer unpacked by ``writer`` as it arrives (blocking)."""
    try:
        _unpack(stream, writer, gzip)
    finally:
        stream.leave()


def _unpack_file(blob: Path, writer: Writer, gzip: bool) -> None:
    with blob.open("rb") as f:
        _unpack(f, writer, gzip)


def _unpack(source: BinaryIO | BlobStream, writer: Writer, gzip: bool) -> None:
    with read_as_package("the layer"):
        unpack_tar(open_source(source, "gzip" if gzip else None), writer)


def _empty(writer: Writer) -> None:
    """What ``writer`` made, removed: the folder is as it was given."""
    for child in list(writer.root.iterdir()):
        remove(child)
