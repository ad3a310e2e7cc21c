"""Alembic environment: always run through mailrouter.store.migrate with a live connection."""

from __future__ import annotations

from alembic import context

from mailrouter.store.models import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only reached by running alembic by hand
    raise SystemExit("run migrations with `mailrouter db upgrade`, not the alembic command")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
