"""Memory templates: one row per template, with the machine that boots it while it is made."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.create_table(
        "templates",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(36), nullable=False, unique=True),
        sa.Column("image_key", sa.String(140), nullable=False, index=True),
        sa.Column("cpus", sa.Integer, nullable=False),
        sa.Column("memory", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("template", sa.JSON, nullable=False),
        sa.Column("machine", sa.String(64), nullable=True),
    )
