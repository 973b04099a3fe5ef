"""Periodic upkeep in the API process: expire silent sessions, delete expired checkpoints.

Both jobs are idempotent database sweeps, so several API processes on one database may run
them at once. Reads never wait for them: expired checkpoints are hidden by
:mod:`tx_server.api.access` from the moment they expire, and sessions also expire lazily on
access; the sweep makes expiry visible to the worker (which frees the slots of finished
sessions) and reclaims disk space.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import anyio.to_thread
from sqlalchemy import select

from tx_server.api.state import AppState
from tx_server.db.database import Database
from tx_server.db.models import CheckpointRow, utcnow
from tx_server.worker.storage import remove_dir

__all__ = ["delete_expired_checkpoints", "maintain_forever", "run_maintenance"]

log = logging.getLogger(__name__)


def delete_expired_checkpoints(db: Database) -> int:
    """Delete checkpoints whose TTL ran out: the rows first, then their files; the count."""
    with db.write() as session:
        rows = session.scalars(
            select(CheckpointRow).where(CheckpointRow.expires_at <= utcnow())
        ).all()
        paths = [Path(row.storage_path) for row in rows]
        for row in rows:
            session.delete(row)
    for path in paths:
        remove_dir(path)
    return len(paths)


def run_maintenance(state: AppState) -> tuple[int, int]:
    """One sweep: ``(sessions expired, checkpoints deleted)``."""
    expired = state.sessions.expire_stale()
    deleted = delete_expired_checkpoints(state.db)
    if expired or deleted:
        log.info("maintenance: %d sessions expired, %d checkpoints deleted", expired, deleted)
    return expired, deleted


async def maintain_forever(state: AppState) -> None:
    """Run :func:`run_maintenance` every ``maintenance_interval_seconds`` until cancelled."""
    while True:
        try:
            await anyio.to_thread.run_sync(run_maintenance, state)
        except Exception:
            log.exception("maintenance failed; retrying at the next interval")
        await asyncio.sleep(state.settings.maintenance_interval_seconds)
