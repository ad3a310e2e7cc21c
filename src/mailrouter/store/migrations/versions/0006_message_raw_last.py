"""messages.raw becomes the table's last column (SQLite only; PostgreSQL is left as it is)

SQLite keeps a row as one record.  A blob that is the record's last field can be inserted
as ``zeroblob(n)`` and filled in slices without SQLite ever holding the whole value; any
other column after it makes SQLite expand the zeros into a full-size buffer first, so a
25 MB message cost 50 MB more at its insert (docs/benchmarks.md, memory).  0001 put
``raw`` mid-table and 0003 added three columns after it.

On SQLite this rebuilds the messages table (copy, drop, rename: batch mode), so it takes
about as long as a backup of the store and needs that much free disk.  Foreign keys stay
valid: ``migrate.upgrade`` runs SQLite migrations with enforcement off and checks every
reference before it commits.  Downgrading changes nothing: column order has no meaning
to SQL.

A later migration that adds a column to ``messages`` must keep ``raw`` last the same way
(``tests/store/test_migrations.py`` checks it).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    columns = [c["name"] for c in sa.inspect(bind).get_columns("messages")]
    if columns[-1] == "raw":
        return
    order = (*(c for c in columns if c != "raw"), "raw")
    with op.batch_alter_table("messages", recreate="always", partial_reordering=[order]):
        pass


def downgrade() -> None:
    pass
