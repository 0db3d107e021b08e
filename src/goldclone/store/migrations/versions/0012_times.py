"""Times as times: every time column becomes ``timestamptz`` on PostgreSQL. SQLite has no
time type; its columns keep RFC 3339 text in UTC, which ``tables.Time`` reads as times."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"

_COLUMNS = [
    ("vms", "expires_at"),
    ("events", "at"),
    ("deliveries", "next_at"),
    ("hosts", "heartbeat_at"),
    ("image_checksums", "at"),
    ("image_sources", "at"),
    ("public_images", "at"),
]


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, column in _COLUMNS:
        op.alter_column(
            table, column, type_=sa.TIMESTAMP(timezone=True), existing_type=sa.String(24),
            postgresql_using=f"{column}::timestamptz",
        )  # fmt: skip
