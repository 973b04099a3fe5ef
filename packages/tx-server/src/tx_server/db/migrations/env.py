"""Alembic environment: runs on the engine handed over by :func:`tx_server.db.database.upgrade`.

There is no alembic.ini: the server builds the config in code, so migrations run the same way
from ``tx serve``, from tests and from ``python -m tx_server``. Offline (SQL script) mode is not
supported because the server always migrates a live database at start. Concurrent starts are
serialized: ``BEGIN IMMEDIATE`` on SQLite (the engine carries ``tx_write``), an advisory lock
on PostgreSQL.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine, text

from tx_server.db.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    """Migrate inside one transaction on the configured engine."""
    engine: Engine | None = config.attributes.get("engine")
    if engine is None:
        raise RuntimeError("tx_server migrations need config.attributes['engine'] (use upgrade())")
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                # API and worker may start together: the second waits, then finds head.
                connection.execute(text("SELECT pg_advisory_xact_lock(7478)"))
            context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("offline migrations are not supported; run upgrade() on a live database")
run_migrations_online()
