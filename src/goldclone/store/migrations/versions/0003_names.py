"""VM names: unique among the VMs that exist; VMs made before have none."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    # SQLite cannot add a column with a constraint; a unique index does the same job.
    op.add_column("vms", sa.Column("name", sa.String(63), nullable=True))
    op.create_index("ix_vms_name", "vms", ["name"], unique=True)
