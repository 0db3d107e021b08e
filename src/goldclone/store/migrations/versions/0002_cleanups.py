"""Cleanups: what a DELETE or a failed create could not remove, for reconciliation to retry."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.create_table(
        "cleanups",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("vm_id", sa.String(36), nullable=False),
        sa.Column("machine", sa.String(64), nullable=False),
        sa.Column("runtime", sa.JSON, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    )
