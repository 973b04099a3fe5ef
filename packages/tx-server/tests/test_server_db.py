"""Migrations and SQLite tuning on a real database file."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from tx_server.db.database import Database
from tx_server.db.models import Base

TABLES = {"alembic_version", "sessions", "models", "checkpoints", "sampling_sessions", "futures"}


def test_migrations_create_the_schema_and_are_idempotent(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'nested' / 'tx.db'}")
    db.upgrade()
    db.upgrade()  # a database at head is left alone
    assert set(inspect(db.engine).get_table_names()) == TABLES
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0002"
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"models and migrations disagree: {diff}"
    uniques = {
        tuple(u["column_names"]) for u in inspect(db.engine).get_unique_constraints("futures")
    }
    assert {("model_id", "seq_id"), ("sampling_session_id", "seq_id")} <= uniques
    assert ("session_id", "model_seq_id") in uniques
    db.dispose()


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'tx.db'}")
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    db.dispose()
