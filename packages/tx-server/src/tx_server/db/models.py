"""Typed ORM models: the durable record of sessions, models, futures, checkpoints, samplers.

Design notes:
* ``futures`` is the request queue. ``id`` (autoincrement) is the arrival order the worker
  follows; ``request_id`` is the opaque string the client polls. Idempotency keys are plain
  UNIQUE constraints (spec §3.8): ``(model_id, seq_id)`` for training requests,
  ``(sampling_session_id, seq_id)`` for sampling and ``(session_id, model_seq_id)`` for the
  model-creating requests. Both SQLite and PostgreSQL treat NULLs as distinct, so each
  constraint only binds the rows that fill both of its columns.
* Payloads and results are bytes plus a content type, because forward/backward bodies and
  results are protobuf while everything else is JSON (spec §0 items 2–3).
* Every timestamp is timezone-aware UTC (:class:`UTCDateTime`), because SQLite drops the zone.
* The schema is owned by the Alembic migrations in ``migrations/versions``; a test checks that
  these models and the migrations agree.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "Base",
    "CheckpointRow",
    "FutureRow",
    "FutureStatus",
    "ModelRow",
    "SamplingSessionRow",
    "SessionRow",
    "UTCDateTime",
    "utcnow",
]


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A DateTime that always comes back timezone-aware (UTC), on SQLite too."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: use timezone-aware UTC")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class FutureStatus(enum.StrEnum):
    """Life cycle of a queued request: pending → running → completed | failed."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


ROW_ID = BigInteger().with_variant(Integer(), "sqlite")
"""An autoincrement key that never runs out: BIGINT on PostgreSQL (``Integer`` would be a 32-bit
SERIAL there), ``INTEGER`` on SQLite, the only spelling that makes it the 64-bit rowid."""


# Deterministic constraint names, so migrations can refer to them on both backends.
_NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base with named constraints and a JSON mapping for ``dict`` columns."""

    metadata = MetaData(naming_convention=_NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, datetime: UTCDateTime}


class SessionRow(Base):
    """A client session (``ServiceClient``): created, heart-beaten, finished once."""

    __tablename__ = "sessions"
    __table_args__ = (UniqueConstraint("tenant_id", "idempotency_key"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(128), index=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    user_metadata: Mapped[dict[str, Any]] = mapped_column(default=dict)
    sdk_version: Mapped[str | None] = mapped_column(String(64))
    project_id: Mapped[str | None] = mapped_column(String(200))
    display_name: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    finish_detail: Mapped[str | None] = mapped_column(Text)


class ModelRow(Base):
    """A training run (LoRA adapter on a base model); id ``{session_id}:train:{model_seq_id}``."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("session_id", "model_seq_id"),)

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    model_seq_id: Mapped[int] = mapped_column(Integer)
    tenant_id: Mapped[str] = mapped_column(String(128), index=True)
    base_model: Mapped[str] = mapped_column(String(500))
    lora_config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    optimizer_config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    user_metadata: Mapped[dict[str, Any]] = mapped_column(default=dict)
    adapter_slot: Mapped[int | None] = mapped_column(Integer)
    corrupted: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_request_at: Mapped[datetime] = mapped_column(default=utcnow)


class CheckpointRow(Base):
    """A saved checkpoint: ``tinker://{model_id}/{segment}/{name}``, stored on local disk."""

    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("model_id", "checkpoint_type", "name"),)

    id: Mapped[int] = mapped_column(ROW_ID, primary_key=True, autoincrement=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(String(128), index=True)
    checkpoint_type: Mapped[str] = mapped_column(String(16))  # training | sampler | external
    name: Mapped[str] = mapped_column(String(200))
    tinker_path: Mapped[str] = mapped_column(String(500), unique=True)
    storage_path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    public: Mapped[bool] = mapped_column(Boolean, default=False)
    user_metadata: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column()


class SamplingSessionRow(Base):
    """A sampler: a base model, or a checkpoint of a training run, to sample from."""

    __tablename__ = "sampling_sessions"
    __table_args__ = (UniqueConstraint("session_id", "sampling_session_seq_id"),)

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    sampling_session_seq_id: Mapped[int] = mapped_column(Integer)
    tenant_id: Mapped[str] = mapped_column(String(128), index=True)
    base_model: Mapped[str] = mapped_column(String(500))
    model_path: Mapped[str | None] = mapped_column(String(500))
    source_model_id: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class FutureRow(Base):
    """One submitted request, its state, and its result or error (the durable queue)."""

    __tablename__ = "futures"
    __table_args__ = (
        UniqueConstraint("model_id", "seq_id"),
        UniqueConstraint("sampling_session_id", "seq_id"),
        UniqueConstraint("session_id", "model_seq_id"),
        Index("ix_futures_status_id", "status", "id"),
        Index("ix_futures_finished_at", "finished_at"),
    )

    id: Mapped[int] = mapped_column(ROW_ID, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(64), unique=True)
    tenant_id: Mapped[str] = mapped_column(String(128))
    request_type: Mapped[str] = mapped_column(String(64))
    session_id: Mapped[str | None] = mapped_column(String(64))
    model_id: Mapped[str | None] = mapped_column(String(200))
    seq_id: Mapped[int | None] = mapped_column(BigInteger)
    model_seq_id: Mapped[int | None] = mapped_column(Integer)
    sampling_session_id: Mapped[str | None] = mapped_column(String(200))
    barrier: Mapped[bool] = mapped_column(Boolean, default=False)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    payload_content_type: Mapped[str] = mapped_column(String(64))
    status: Mapped[FutureStatus] = mapped_column(
        Enum(
            FutureStatus,
            native_enum=False,
            length=16,
            values_callable=lambda e: [m.value for m in e],
        ),
        default=FutureStatus.PENDING,
    )
    result: Mapped[bytes | None] = mapped_column(LargeBinary)
    result_content_type: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    error_category: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
