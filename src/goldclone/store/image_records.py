"""Who may use which image package: the tenants that showed they have it, by the URLs they
fetched it from, and the packages an operator made public. Shared by every host."""

from __future__ import annotations

from sqlalchemy import or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from goldclone.clock import now
from goldclone.store.tables import image_sources as _sources
from goldclone.store.tables import public_images as _public


async def add_source(conn: AsyncConnection, sha256: str, url_sha256: str, tenant: str) -> None:
    """Remember that ``tenant`` fetched the package ``sha256`` from the URL ``url_sha256``."""
    # the same source may be remembered by two transactions at once
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    await conn.execute(
        insert(_sources)
        .values(sha256=sha256, url_sha256=url_sha256, tenant=tenant, at=now())
        .on_conflict_do_nothing()
    )


async def shown(conn: AsyncConnection, sha256: str, url_sha256: str, tenant: str) -> bool:
    """Whether ``tenant`` has shown it has the package ``sha256``, or the URL ``url_sha256``
    was shown to give it, or it is public."""
    sources = select(_sources.c.at).where(
        _sources.c.sha256 == sha256,
        or_(_sources.c.url_sha256 == url_sha256, _sources.c.tenant == tenant),
    )
    if (await conn.execute(sources.limit(1))).first() is not None:
        return True
    return sha256 in await public(conn)


async def of_tenant(conn: AsyncConnection, tenant: str) -> set[str]:
    """The packages that ``tenant`` showed it has, and the public ones."""
    own = select(_sources.c.sha256).where(_sources.c.tenant == tenant)
    found = {row.sha256 for row in await conn.execute(own)}
    return found | await public(conn)


async def public(conn: AsyncConnection) -> set[str]:
    return {row.sha256 for row in await conn.execute(select(_public.c.sha256))}


async def set_public(conn: AsyncConnection, sha256: str, public: bool) -> None:
    """Make the package every tenant's, or only theirs that showed they have it."""
    await conn.execute(_public.delete().where(_public.c.sha256 == sha256))
    if public:
        await conn.execute(_public.insert().values(sha256=sha256, at=now()))
