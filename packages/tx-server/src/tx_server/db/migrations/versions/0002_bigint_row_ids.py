"""64-bit autoincrement ids for ``futures`` and ``checkpoints`` on PostgreSQL.

Why: ``Integer`` primary keys became SERIAL columns (and ``AS integer`` sequences) on
PostgreSQL, which run out after 2^31 rows: a server answering a few hundred sample requests a
second would find every submission refused within months, although finished futures are
pruned. SQLite's ``INTEGER PRIMARY KEY`` is the 64-bit rowid already, so nothing changes there
(the models map the type to ``INTEGER`` on SQLite, the only spelling that is the rowid).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLES = ("futures", "checkpoints")


def _retype(new: sa.types.TypeEngine[int], old: sa.types.TypeEngine[int], as_: str) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    for table in _TABLES:
        op.alter_column(table, "id", type_=new, existing_type=old, existing_nullable=False)
        sequence = bind.scalar(sa.text("SELECT pg_get_serial_sequence(:t, 'id')"), {"t": table})
        if sequence is not None:
            op.execute(f"ALTER SEQUENCE {sequence} AS {as_}")


def upgrade() -> None:
    _retype(sa.BigInteger(), sa.Integer(), "bigint")


def downgrade() -> None:
    _retype(sa.Integer(), sa.BigInteger(), "integer")
