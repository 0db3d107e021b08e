"""Gold images by content: each checksum verified against an image package (``md5-<hex>``),
with the sha256 of that package, so that one package fetched by several checksums is one gold
image."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    op.create_table(
        "image_checksums",
        sa.Column("name", sa.String(140), primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False, index=True),
        sa.Column("at", sa.String(24), nullable=False),
    )
