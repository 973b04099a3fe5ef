"""Engine, sessions and migrations for SQLite (default) and PostgreSQL (by URL).

SQLite is tuned for a queue shared by two processes (API and worker): WAL mode so readers never
block the writer, a busy timeout so a writer waits instead of failing, and foreign keys on.
Writes go through :meth:`Database.write`, which on SQLite opens ``BEGIN IMMEDIATE``: a
read-then-write transaction (claiming work, idempotent insert) takes the write lock up front
instead of failing with ``SQLITE_BUSY`` when it upgrades. Reads (:meth:`Database.read`) use a
plain deferred ``BEGIN`` and never take the lock, so long-poll re-checks stay cheap.

The request queue's hot statements (submit, claim, complete, poll) use :meth:`Database.core_write`
and :meth:`Database.core_read` — SQLAlchemy Core on a bare connection, with statements built
once at import — instead of ORM sessions: on a slow CPU an ORM insert costs ~2.5 ms of Python
against ~0.1 ms for SQLite itself, and every queued future pays four such statements.

The schema is created only by Alembic (:func:`upgrade`), never by ``create_all``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.orm import Session, sessionmaker

__all__ = ["Database", "WriteTx", "alembic_config", "sqlite_path", "upgrade"]

_MIGRATIONS = Path(__file__).parent / "migrations"
_BUSY_TIMEOUT_MS = 30_000


def sqlite_path(url: str | URL) -> Path | None:
    """The database file of a file-backed SQLite URL, else None (memory DB or PostgreSQL)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def _tune_sqlite(engine: Engine) -> None:
    """WAL, busy timeout, foreign keys; manual BEGIN so writes can ask for IMMEDIATE."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # let the "begin" hook below emit BEGIN itself
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get("tx_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = sqlite_path(parsed)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"check_same_thread": False})
        _tune_sqlite(engine)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")  # psycopg 3, not psycopg2
    return create_engine(parsed, pool_pre_ping=True)


class WriteTx:
    """A Core write transaction: its connection plus callbacks to run once it has committed."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.after_commit: list[Callable[[], None]] = []


class Database:
    """One process's handle on the database: an engine and read/write session factories."""

    def __init__(self, url: str) -> None:
        self.url = make_url(url)
        self.engine = _make_engine(url)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self.is_postgresql = self.engine.dialect.name == "postgresql"
        self._reader = sessionmaker(self.engine, expire_on_commit=False)
        self._write_engine = self.engine.execution_options(tx_write=True)
        self._writer = sessionmaker(self._write_engine, expire_on_commit=False)

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only unit of work; objects stay usable (detached, not expired) afterwards."""
        with self._reader() as session:
            yield session

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """A write transaction, committed on success and rolled back on error."""
        with self._writer() as session, session.begin():
            yield session

    @contextlib.contextmanager
    def core_read(self) -> Iterator[Connection]:
        """A Core connection for a read (no lock taken; see the module docstring)."""
        with self.engine.connect() as conn:
            yield conn

    @contextlib.contextmanager
    def core_write(self) -> Iterator[WriteTx]:
        """A Core write transaction (``BEGIN IMMEDIATE`` on SQLite), committed on success.

        Callbacks appended to ``tx.after_commit`` run after the commit (never after a rollback):
        that is when a wake-up may tell another process to look.
        """
        with self._write_engine.begin() as conn:
            tx = WriteTx(conn)
            yield tx
        for callback in tx.after_commit:
            callback()

    def upgrade(self) -> None:
        """Apply all migrations (idempotent: a database at head is left unchanged)."""
        upgrade(self.engine)

    def dispose(self) -> None:
        """Close pooled connections (call at process shutdown)."""
        self.engine.dispose()


def alembic_config(engine: Engine) -> Config:
    """An Alembic config that runs the package's migrations on ``engine`` (no alembic.ini)."""
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.attributes["engine"] = engine.execution_options(tx_write=True)
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """``alembic upgrade <revision>`` through the API, on the given engine."""
    command.upgrade(alembic_config(engine), revision)
