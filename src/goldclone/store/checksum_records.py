"""Checksums verified against image packages, shared by every host."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from goldclone.clock import now
from goldclone.store.database import Database
from goldclone.store.tables import image_checksums as _checksums


async def every(conn: AsyncConnection) -> dict[str, str]:
    """Every checksum verified against an image package (``md5-<hex>``), with the sha256 of
    that package."""
    rows = await conn.execute(select(_checksums.c.name, _checksums.c.sha256))
    return {row.name: row.sha256 for row in rows}


async def add(conn: AsyncConnection, name: str, sha256: str) -> None:
    """Remember that the checksum ``name`` was verified against the package ``sha256``."""
    await conn.execute(_checksums.delete().where(_checksums.c.name == name))
    await conn.execute(_checksums.insert().values(name=name, sha256=sha256, at=now()))


class Checksums:
    """The checksums on ``db``, as the image cache keeps them (``images.cache.ChecksumBook``)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def checksums(self) -> dict[str, str]:
        return await self._db.read(every)

    async def add_checksum(self, name: str, sha256: str) -> None:
        await self._db.write(lambda conn: add(conn, name, sha256))
