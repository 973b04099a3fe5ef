"""Who may see a checkpoint: its owner always, anyone while it is public, nobody once expired.

One helper for every route that reads a checkpoint (weights_info, load, sampling, archives,
publish), so sharing and expiry cannot be enforced in one place and forgotten in another. An
expired checkpoint is treated as deleted from the moment ``expires_at`` passes, even before
the maintenance task (:mod:`tx_server.api.maintenance`) removes its row and files. Foreign
private checkpoints are reported exactly like missing ones (404), so ids leak nothing.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ColumnElement, or_
from sqlalchemy.orm import Session

from tx_server.db.models import CheckpointRow, utcnow
from tx_server.errors import BadRequestError, NotFoundError
from tx_server.worker.storage import TYPES, find_checkpoint
from tx_types.paths import make_tinker_path

__all__ = [
    "is_live",
    "live_checkpoint",
    "owned_checkpoint",
    "readable_checkpoint",
    "route_tinker_path",
]


def route_tinker_path(run_id: str, kind: str, name: str) -> str:
    """The tinker path of REST route parts ``{run_id}/checkpoints/{kind}/{name}`` (400 if bad)."""
    if kind not in TYPES:
        raise BadRequestError(f"checkpoint kind {kind!r} must be one of {sorted(TYPES)}")
    try:
        return make_tinker_path(run_id, TYPES[kind], name)  # type: ignore[arg-type]
    except ValueError as exc:
        raise BadRequestError(f"invalid checkpoint {run_id!r}/{kind}/{name!r}: {exc}") from None


def is_live(row: CheckpointRow, now: datetime | None = None) -> bool:
    """False once the checkpoint's TTL has run out."""
    return row.expires_at is None or row.expires_at > (now or utcnow())


def live_checkpoint(now: datetime | None = None) -> ColumnElement[bool]:
    """SQL condition matching checkpoints whose TTL has not run out."""
    return or_(CheckpointRow.expires_at.is_(None), CheckpointRow.expires_at > (now or utcnow()))


def readable_checkpoint(session: Session, tenant: str, tinker_path: str) -> CheckpointRow:
    """The live checkpoint at ``tinker_path`` if ``tenant`` owns it or it is public; else 404."""
    row = find_checkpoint(session, tinker_path)
    if row is None or not is_live(row) or not (row.tenant_id == tenant or row.public):
        raise NotFoundError(f"unknown checkpoint {tinker_path!r}")
    return row


def owned_checkpoint(session: Session, tenant: str, tinker_path: str) -> CheckpointRow:
    """The live checkpoint at ``tinker_path`` if ``tenant`` owns it (public or not); else 404."""
    row = find_checkpoint(session, tinker_path)
    if row is None or not is_live(row) or row.tenant_id != tenant:
        raise NotFoundError(f"unknown checkpoint {tinker_path!r}")
    return row
