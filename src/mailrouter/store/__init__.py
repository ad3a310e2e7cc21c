"""The store: SQLAlchemy models (``models``), engine and transactions (``db``), group
commit (``writer``), shared look-ups (``queries``) and Alembic migrations (``migrate``)."""
