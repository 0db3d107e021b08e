"""Tenants: each VM is its tenant's, and its name and idempotency key are unique within its
tenant only. VMs made before are the default tenant's."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"

_NAMES = {"uq": "uq_%(table_name)s_%(column_0_name)s"}
"""Names for SQLite's unnamed unique constraints, so that the batch can drop one."""


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    # revision 0001 made the key unique by an unnamed constraint; PostgreSQL named it
    key_unique = "uq_vms_idempotency_key" if sqlite else "vms_idempotency_key_key"
    with op.batch_alter_table("vms", naming_convention=_NAMES) as batch:
        batch.add_column(
            sa.Column("tenant", sa.String(63), nullable=False, server_default="default")
        )
        batch.drop_constraint(key_unique, type_="unique")
        batch.drop_index("ix_vms_name")
        batch.create_index("ix_vms_tenant_name", ["tenant", "name"], unique=True)
        batch.create_index(
            "ix_vms_tenant_idempotency_key", ["tenant", "idempotency_key"], unique=True
        )
