"""The store's tables as its queries see them; ``store/migrations`` makes them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, Dialect, Index, Integer, MetaData, String, Table, Text
from sqlalchemy.dialects.postgresql import TIMESTAMP
from sqlalchemy.types import TypeDecorator, TypeEngine

from goldclone.access import DEFAULT_TENANT
from goldclone.clock import parse_rfc3339, rfc3339_ms, utc

metadata = MetaData()


class Time(TypeDecorator[datetime]):
    """A time, an aware UTC datetime to its users: ``timestamptz`` on PostgreSQL; on SQLite,
    which has no time type, RFC 3339 text to the millisecond in UTC, whose order is the
    times' order."""

    impl = String(24)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(TIMESTAMP(timezone=True))
        return dialect.type_descriptor(String(24))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> object:
        if value is None:
            return None
        return utc(value) if dialect.name == "postgresql" else rfc3339_ms(value)

    def process_result_value(self, value: object, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return utc(value) if isinstance(value, datetime) else parse_rfc3339(str(value))


vms = Table(
    "vms",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(36), nullable=False, unique=True),
    Column("status", String(16), nullable=False, index=True),
    Column("vm", JSON, nullable=False),
    Column("runtime", JSON, nullable=False),
    Column("idempotency_key", String(255), nullable=True),
    Column("request_digest", String(64), nullable=True),
    Column("name", String(63), nullable=True),
    Column("expires_at", Time(), nullable=True, index=True),
    Column("host_id", String(64), nullable=True, index=True),
    Column("tenant", String(63), nullable=False, server_default=DEFAULT_TENANT),
    Index("ix_vms_tenant_name", "tenant", "name", unique=True),
    Index("ix_vms_tenant_idempotency_key", "tenant", "idempotency_key", unique=True),
)

cleanups = Table(
    "cleanups",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("vm_id", String(36), nullable=False),
    Column("machine", String(64), nullable=False),
    Column("runtime", JSON, nullable=False),
    Column("reason", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("host_id", String(64), nullable=True, index=True),
)

templates = Table(
    "templates",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(36), nullable=False, unique=True),
    Column("image_key", String(140), nullable=False, index=True),
    Column("cpus", Integer, nullable=False),
    Column("memory", Integer, nullable=False),
    Column("disk_size", Integer, nullable=True),
    Column("status", String(16), nullable=False),
    Column("template", JSON, nullable=False),
    Column("machine", String(64), nullable=True),
    Column("host_id", String(64), nullable=True, index=True),
)

pools = Table(
    "pools",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("name", String(63), nullable=False, unique=True),
    Column("pool", JSON, nullable=False),
)

pool_members = Table(
    "pool_members",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("machine", String(64), nullable=False, unique=True),
    Column("pool", String(63), nullable=False, index=True),
    Column("status", String(16), nullable=False),
    Column("cpus", Integer, nullable=False),
    Column("memory", Integer, nullable=False),
    Column("runtime", JSON, nullable=False),
    Column("host_id", String(64), nullable=True, index=True),
)

events = Table(
    "events",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),
    Column("subject", String(140), nullable=False),
    Column("data", JSON, nullable=False),
    Column("at", Time(), nullable=False),
    sqlite_autoincrement=True,
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("message_id", String(40), nullable=False, unique=True),
    Column("vm_id", String(36), nullable=False),
    Column("url", Text, nullable=False),
    Column("body", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_at", Time(), nullable=False, index=True),
    Column("host_id", String(64), nullable=True, index=True),
)

hosts = Table(
    "hosts",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("host", JSON, nullable=False),
    Column("heartbeat_at", Time(), nullable=False),
)
"""The services on this database: each one's capacity and offer (``host``), and when it last
said it was alive."""

handoffs = Table(
    "handoffs",
    metadata,
    Column("vm_id", String(36), primary_key=True),
    Column("host_id", String(64), nullable=False, index=True),
    Column("request", Text, nullable=False),
)
"""Creates that one host placed on another: the request (with its secrets, which no VM record
holds) waits here until that host takes it."""

image_checksums = Table(
    "image_checksums",
    metadata,
    Column("name", String(140), primary_key=True),
    Column("sha256", String(64), nullable=False, index=True),
    Column("at", Time(), nullable=False),
)

image_sources = Table(
    "image_sources",
    metadata,
    Column("sha256", String(64), primary_key=True),
    Column("url_sha256", String(64), primary_key=True),
    Column("tenant", String(63), primary_key=True),
    Column("at", Time(), nullable=False),
)
"""Which tenant showed, by which URL (its sha256: a URL may hold a secret), that it has an
image package (its sha256)."""

public_images = Table(
    "public_images",
    metadata,
    Column("sha256", String(64), primary_key=True),
    Column("at", Time(), nullable=False),
)
"""The image packages that an operator made every tenant's."""

console_tails = Table(
    "console_tails",
    metadata,
    Column("vm_id", String(36), primary_key=True),
    Column("text", Text, nullable=False),
)
"""The end of the console of each VM that failed, kept after its folder is gone."""
