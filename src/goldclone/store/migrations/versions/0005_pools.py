"""Warm pools: one row per pool, and one per machine that a pool keeps (being restored, or
ready to be claimed)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    op.create_table(
        "pools",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(63), nullable=False, unique=True),
        sa.Column("pool", sa.JSON, nullable=False),
    )
    op.create_table(
        "pool_members",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("machine", sa.String(64), nullable=False, unique=True),
        sa.Column("pool", sa.String(63), nullable=False, index=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("cpus", sa.Integer, nullable=False),
        sa.Column("memory", sa.Integer, nullable=False),
        sa.Column("runtime", sa.JSON, nullable=False),
    )
