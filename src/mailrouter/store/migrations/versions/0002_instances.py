"""instances, claim owners and leases: a dead process's work comes back in seconds

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import mailrouter.store.models

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "instances",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=300), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", mailrouter.store.models.UTCDateTime(), nullable=False),
        sa.Column("heartbeat_at", mailrouter.store.models.UTCDateTime(), nullable=False),
        sa.Column("stopped_at", mailrouter.store.models.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instances")),
    )
    op.create_index("ix_instances_name", "instances", ["name"])
    op.create_table(
        "leases",
        sa.Column("name", sa.String(length=600), nullable=False),
        sa.Column("holder", sa.String(length=32), nullable=False),
        sa.Column("expires_at", mailrouter.store.models.UTCDateTime(), nullable=False),
        sa.Column("acquired_at", mailrouter.store.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_leases")),
    )
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("claimed_by", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("claimed_by")
    op.drop_table("leases")
    op.drop_index("ix_instances_name", table_name="instances")
    op.drop_table("instances")
