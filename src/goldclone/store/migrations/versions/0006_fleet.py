"""The fleet's lifecycle: each VM's lease, as a column the expiry sweep can query; the log of
changes that ``GET /events`` streams and ``?wait=true`` waits on; and the callbacks still to
deliver, so that a restart does not lose them."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.add_column(sa.Column("expires_at", sa.String(24), nullable=True))
        batch.create_index("ix_vms_expires_at", ["expires_at"])
    op.create_table(
        "events",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("subject", sa.String(140), nullable=False),
        sa.Column("data", sa.JSON, nullable=False),
        sa.Column("at", sa.String(24), nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "deliveries",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("message_id", sa.String(40), nullable=False, unique=True),
        sa.Column("vm_id", sa.String(36), nullable=False),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_at", sa.String(24), nullable=False, index=True),
    )
