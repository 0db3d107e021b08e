"""Images by tenant: which tenant showed, by which URL, that it has an image package, and the
packages an operator made public. Images fetched before are shown by the URL in their
``gold.json``, which the cache still takes as shown."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"


def upgrade() -> None:
    op.create_table(
        "image_sources",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("url_sha256", sa.String(64), primary_key=True),
        sa.Column("tenant", sa.String(63), primary_key=True),
        sa.Column("at", sa.String(24), nullable=False),
    )
    op.create_table(
        "public_images",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("at", sa.String(24), nullable=False),
    )
