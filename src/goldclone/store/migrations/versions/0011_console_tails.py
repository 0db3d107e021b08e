"""The end of a failed VM's console, kept in the store (every host reads it) after the VM's
folder is removed, until the VM is deleted."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"


def upgrade() -> None:
    op.create_table(
        "console_tails",
        sa.Column("vm_id", sa.String(36), primary_key=True),
        sa.Column("text", sa.Text, nullable=False),
    )
