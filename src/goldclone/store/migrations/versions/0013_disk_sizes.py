"""A template's disk size is part of its shape: null for those made before (the image's
size)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"


def upgrade() -> None:
    op.add_column("templates", sa.Column("disk_size", sa.Integer, nullable=True))
