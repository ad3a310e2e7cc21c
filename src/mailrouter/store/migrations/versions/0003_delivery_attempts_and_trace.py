"""delivery attempts and trace: outbox_attempts, the envelope and routing step of a message,
the IMAP watcher's last sync, and the indexes `queue`, `status` and the metrics read

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import mailrouter.store.models

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "outbox_attempts",
        sa.Column("id", _ID, nullable=False),
        sa.Column("outbox_id", _ID, nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("started_at", mailrouter.store.models.UTCDateTime(), nullable=False),
        sa.Column("finished_at", mailrouter.store.models.UTCDateTime(), nullable=False),
        sa.Column("status", sa.String(length=10), nullable=False),
        sa.Column("relay", sa.String(length=400), nullable=False),
        sa.Column("dsn", sa.String(length=16), nullable=True),
        sa.Column("reply", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["outbox_id"], ["outbox.id"], name=op.f("fk_outbox_attempts_outbox_id_outbox")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_attempts")),
    )
    with op.batch_alter_table("outbox_attempts", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_outbox_attempts_outbox_id"), ["outbox_id"], unique=False
        )

    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("envelope_from", sa.String(length=320), nullable=True))
        batch_op.add_column(sa.Column("step", sa.String(length=50), nullable=True))
        batch_op.add_column(sa.Column("matched_id", sa.String(length=998), nullable=True))
        batch_op.create_index("ix_messages_status", ["status", "received_at"], unique=False)

    with op.batch_alter_table("interactions", schema=None) as batch_op:
        batch_op.create_index(
            "ix_interactions_status", ["status", "account_id", "unread"], unique=False
        )

    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.create_index("ix_outbox_message_pk", ["message_pk"], unique=False)

    with op.batch_alter_table("imap_state", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("last_sync_at", mailrouter.store.models.UTCDateTime(), nullable=True)
        )


def downgrade() -> None:
    # ALTER TABLE … DROP COLUMN (SQLite 3.35+), not batch mode's copy-and-rename: SQLite
    # cannot drop a table other rows point at while foreign keys are enforced.  (SQLite
    # older than 3.35 cannot downgrade this revision; restore the backup instead.)
    with op.batch_alter_table("imap_state", schema=None, recreate="never") as batch_op:
        batch_op.drop_column("last_sync_at")

    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_index("ix_outbox_message_pk")

    with op.batch_alter_table("interactions", schema=None) as batch_op:
        batch_op.drop_index("ix_interactions_status")

    with op.batch_alter_table("messages", schema=None, recreate="never") as batch_op:
        batch_op.drop_index("ix_messages_status")
        batch_op.drop_column("matched_id")
        batch_op.drop_column("step")
        batch_op.drop_column("envelope_from")

    with op.batch_alter_table("outbox_attempts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_outbox_attempts_outbox_id"))
    op.drop_table("outbox_attempts")
