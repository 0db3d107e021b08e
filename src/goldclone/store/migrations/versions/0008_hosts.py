"""Several hosts on one database: the hosts that serve it, with their capacity and heartbeat;
the creates placed on a host by another, until that host takes them; and, on every record
that a host's machines and files stand behind, the host it belongs to.
Records made before have none: the first service to start on the database after the upgrade
takes them (``host_records.adopt_unowned``), as the one host that made them."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"

OWNED = ("vms", "cleanups", "templates", "pool_members", "deliveries")


def upgrade() -> None:
    op.create_table(
        "hosts",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("host", sa.JSON, nullable=False),
        sa.Column("heartbeat_at", sa.String(24), nullable=False),
    )
    op.create_table(
        "handoffs",
        sa.Column("vm_id", sa.String(36), primary_key=True),
        sa.Column("host_id", sa.String(64), nullable=False, index=True),
        sa.Column("request", sa.Text, nullable=False),
    )
    for table in OWNED:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("host_id", sa.String(64), nullable=True))
            batch.create_index(f"ix_{table}_host_id", ["host_id"])
