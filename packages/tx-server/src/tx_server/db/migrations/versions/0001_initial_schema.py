"""Initial schema: sessions, models, checkpoints, sampling sessions, futures.

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "futures",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("request_type", sa.String(length=64), nullable=False),
        sa.Column("session_id", sa.String(length=64), nullable=True),
        sa.Column("model_id", sa.String(length=200), nullable=True),
        sa.Column("seq_id", sa.BigInteger(), nullable=True),
        sa.Column("model_seq_id", sa.Integer(), nullable=True),
        sa.Column("sampling_session_id", sa.String(length=200), nullable=True),
        sa.Column("barrier", sa.Boolean(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("payload_content_type", sa.String(length=64), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "pending",
                "running",
                "completed",
                "failed",
                name="futurestatus",
                native_enum=False,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("result", sa.LargeBinary(), nullable=True),
        sa.Column("result_content_type", sa.String(length=64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("error_category", sa.String(length=16), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_futures")),
        sa.UniqueConstraint("model_id", "seq_id", name=op.f("uq_futures_model_id_seq_id")),
        sa.UniqueConstraint("request_id", name=op.f("uq_futures_request_id")),
        sa.UniqueConstraint(
            "sampling_session_id", "seq_id", name=op.f("uq_futures_sampling_session_id_seq_id")
        ),
        sa.UniqueConstraint(
            "session_id", "model_seq_id", name=op.f("uq_futures_session_id_model_seq_id")
        ),
    )
    with op.batch_alter_table("futures", schema=None) as batch_op:
        batch_op.create_index("ix_futures_finished_at", ["finished_at"], unique=False)
        batch_op.create_index("ix_futures_status_id", ["status", "id"], unique=False)

    op.create_table(
        "sessions",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("user_metadata", sa.JSON(), nullable=False),
        sa.Column("sdk_version", sa.String(length=64), nullable=True),
        sa.Column("project_id", sa.String(length=200), nullable=True),
        sa.Column("display_name", sa.String(length=500), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finish_reason", sa.String(length=32), nullable=True),
        sa.Column("finish_detail", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sessions")),
        sa.UniqueConstraint(
            "tenant_id", "idempotency_key", name=op.f("uq_sessions_tenant_id_idempotency_key")
        ),
    )
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sessions_tenant_id"), ["tenant_id"], unique=False)

    op.create_table(
        "models",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("session_id", sa.String(length=64), nullable=False),
        sa.Column("model_seq_id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("base_model", sa.String(length=500), nullable=False),
        sa.Column("lora_config", sa.JSON(), nullable=False),
        sa.Column("optimizer_config", sa.JSON(), nullable=False),
        sa.Column("user_metadata", sa.JSON(), nullable=False),
        sa.Column("adapter_slot", sa.Integer(), nullable=True),
        sa.Column("corrupted", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_request_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["sessions.id"],
            name=op.f("fk_models_session_id_sessions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.UniqueConstraint(
            "session_id", "model_seq_id", name=op.f("uq_models_session_id_model_seq_id")
        ),
    )
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_models_tenant_id"), ["tenant_id"], unique=False)

    op.create_table(
        "sampling_sessions",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("session_id", sa.String(length=64), nullable=False),
        sa.Column("sampling_session_seq_id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("base_model", sa.String(length=500), nullable=False),
        sa.Column("model_path", sa.String(length=500), nullable=True),
        sa.Column("source_model_id", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["sessions.id"],
            name=op.f("fk_sampling_sessions_session_id_sessions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sampling_sessions")),
        sa.UniqueConstraint(
            "session_id",
            "sampling_session_seq_id",
            name=op.f("uq_sampling_sessions_session_id_sampling_session_seq_id"),
        ),
    )
    with op.batch_alter_table("sampling_sessions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_sampling_sessions_tenant_id"), ["tenant_id"], unique=False
        )

    op.create_table(
        "checkpoints",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model_id", sa.String(length=200), nullable=False),
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("checkpoint_type", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("tinker_path", sa.String(length=500), nullable=False),
        sa.Column("storage_path", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("public", sa.Boolean(), nullable=False),
        sa.Column("user_metadata", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["model_id"],
            ["models.id"],
            name=op.f("fk_checkpoints_model_id_models"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_checkpoints")),
        sa.UniqueConstraint(
            "model_id",
            "checkpoint_type",
            "name",
            name=op.f("uq_checkpoints_model_id_checkpoint_type_name"),
        ),
        sa.UniqueConstraint("tinker_path", name=op.f("uq_checkpoints_tinker_path")),
    )
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_checkpoints_tenant_id"), ["tenant_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_checkpoints_tenant_id"))

    op.drop_table("checkpoints")
    with op.batch_alter_table("sampling_sessions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sampling_sessions_tenant_id"))

    op.drop_table("sampling_sessions")
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_models_tenant_id"))

    op.drop_table("models")
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sessions_tenant_id"))

    op.drop_table("sessions")
    with op.batch_alter_table("futures", schema=None) as batch_op:
        batch_op.drop_index("ix_futures_status_id")
        batch_op.drop_index("ix_futures_finished_at")

    op.drop_table("futures")
