"""The names a gold image is known by, and what it is.

A gold image is its disk: ``disk_sha256`` in its ``gold.json`` (``identity_of``). It is named
by the checksum it was first fetched by (its folder), by its package's sha256, and by every
name verified since to be that package or that disk: another checksum of the package
(``md5-<hex>``), the sha256 of another package that carried the same disk, a registry
manifest that carries it (``oci-<hex>``). Those names are kept in the store (the
``ChecksumBook``), shared by every host, each with the sha256 it was verified to be.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from goldclone.images.gold import content_of, identity_of, read_metadata


class ChecksumBook(Protocol):
    """Where the names verified against packages and disks are kept (the store): each name,
    ``<type>-<checksum>`` or ``oci-<hex>``, with the sha256 it was verified to be."""

    async def checksums(self) -> dict[str, str]: ...

    async def add_checksum(self, name: str, sha256: str) -> None: ...


class GoldNames:
    """What each name resolves to, for the gold images under ``images``."""

    def __init__(self, images: Path, book: ChecksumBook | None) -> None:
        self._images = images
        self._book = book
        self.learnt: dict[str, str] = {}
        """The sha256 (of a package or a disk) that each name was verified to be."""
        self._by_content: dict[str, str] = {}
        """The gold image (its key) of each package sha256."""
        self._by_disk: dict[str, str] = {}
        """The gold image (its key) of each disk sha256."""
        self._chunks: dict[str, tuple[str, int]] = {}
        """Each registry chunk that a gold image's disk holds: the image and the offset."""

    async def open(self) -> None:
        if self._book is not None:
            self.learnt = await self._book.checksums()

    def scan(self) -> None:
        """Read every gold image's ``gold.json`` (blocking); sha256-named images first, so
        that an image whose ID is its package's sha256 is the one that package names."""
        for root in sorted(self._images.glob("*-*"), key=lambda r: r.name[:7] != "sha256-"):
            if (meta := read_metadata(root)) is not None:
                self.register(root.name, meta)

    def register(self, key: str, meta: dict[str, Any]) -> None:
        if (content := content_of(key, meta)) is not None:
            self._by_content.setdefault(content, key)
        if (identity := identity_of(meta)) is not None:
            self._by_disk.setdefault(identity, key)
        chunks = meta.get("chunks") or {}
        for n, (layer, _) in enumerate(chunks.get("layers", [])):
            self._chunks.setdefault(layer, (key, n * int(chunks["size"])))

    def forget(self, key: str) -> None:
        self._by_content = {c: k for c, k in self._by_content.items() if k != key}
        self._by_disk = {c: k for c, k in self._by_disk.items() if k != key}
        self._chunks = {c: found for c, found in self._chunks.items() if found[0] != key}

    def resolve(self, key: str) -> str:
        """The ID of the gold image that ``key`` names: the image fetched by it, or the one
        whose package or disk ``key`` was verified to be; ``key`` itself when there is none."""
        if key.startswith(".") or "/" in key or read_metadata(self._images / key) is not None:
            return key
        kind, _, value = key.partition("-")
        contents = [value] if kind == "sha256" else []
        if (learnt := self.learnt.get(key)) is not None:
            contents.append(learnt)
        for content in contents:
            if (found := self.holding(content)) is not None:
                return found
        return key

    def holding(self, sha256: str) -> str | None:
        """The gold image on disk whose package or disk has the sha256 ``sha256``."""
        for key in (self._by_content.get(sha256), self._by_disk.get(sha256)):
            if key is not None and read_metadata(self._images / key) is not None:
                return key
        return None

    def chunk(self, layer: str) -> tuple[str, int] | None:
        """The gold image whose disk holds the registry chunk ``layer``, and where."""
        return self._chunks.get(layer)

    async def learn(self, name: str, sha256: str) -> None:
        """Remember that ``name`` was verified to be the package or disk ``sha256``."""
        if name == f"sha256-{sha256}" or self.learnt.get(name) == sha256:
            return
        if self._book is not None:
            await self._book.add_checksum(name, sha256)
        self.learnt[name] = sha256

    def manifests_of(self, key: str, meta: dict[str, Any]) -> list[str]:
        """The registry manifests (``oci-<hex>``) verified to carry the gold image ``key``."""
        own = identity_of(meta)
        return sorted(n for n, sha256 in self.learnt.items() if n[:4] == "oci-" and sha256 == own)

    def names_of(self, key: str, meta: dict[str, Any]) -> dict[str, str]:
        """Every checksum the gold image ``key`` is known by, type to hex: the one it was
        fetched by, its package's sha256, and those verified against it since."""
        kind, checksum = key.split("-", 1)
        known = {kind: checksum}
        own = {content_of(key, meta), identity_of(meta)} - {None}
        if (content := content_of(key, meta)) is not None:
            known["sha256"] = content
        for name, sha256 in self.learnt.items():
            other, _, value = name.partition("-")
            if sha256 in own and other != "oci":
                known.setdefault(other, value)
        return dict(sorted(known.items()))
