"""Client sessions: create (idempotent per transport retry), heartbeat, finish (first wins).

A finished session answers heartbeats with 410, which stops the SDK's heartbeat loop (spec
§4.6). Sessions of another tenant are reported as absent (404), never as forbidden, so ids
leak nothing.
"""

from __future__ import annotations

import uuid

from sqlalchemy import select

from tx_server.db.database import Database
from tx_server.db.models import SessionRow, utcnow
from tx_server.errors import NotFoundError, SessionFinishedError

__all__ = ["SessionService"]


class SessionService:
    """Synchronous session operations (FastAPI runs them in its thread pool)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(
        self,
        tenant_id: str,
        *,
        tags: list[str],
        user_metadata: dict[str, object],
        sdk_version: str | None,
        project_id: str | None,
        display_name: str | None,
        idempotency_key: str | None,
    ) -> str:
        """A new session id; a transport retry (same ``X-Idempotency-Key``) gets the same id."""
        with self.db.write() as session:
            if idempotency_key is not None:
                earlier = session.scalar(
                    select(SessionRow.id).where(
                        SessionRow.tenant_id == tenant_id,
                        SessionRow.idempotency_key == idempotency_key,
                    )
                )
                if earlier is not None:
                    return earlier
            row = SessionRow(
                id=str(uuid.uuid4()),
                tenant_id=tenant_id,
                idempotency_key=idempotency_key,
                tags=list(tags),
                user_metadata=dict(user_metadata),
                sdk_version=sdk_version,
                project_id=project_id,
                display_name=display_name,
            )
            session.add(row)
            return row.id

    def get_owned(self, tenant_id: str, session_id: str) -> SessionRow:
        """The tenant's session, or NotFoundError (also for other tenants' sessions)."""
        with self.db.read() as session:
            row = session.get(SessionRow, session_id)
            if row is None or row.tenant_id != tenant_id:
                raise NotFoundError(f"unknown session_id {session_id!r}")
            return row

    def heartbeat(self, tenant_id: str, session_id: str) -> None:
        """Record liveness; SessionFinishedError (410) once the session is finished."""
        with self.db.write() as session:
            row = session.get(SessionRow, session_id)
            if row is None or row.tenant_id != tenant_id:
                raise NotFoundError(f"unknown session_id {session_id!r}")
            if row.finished_at is not None:
                raise SessionFinishedError(f"session {session_id} is finished")
            row.last_heartbeat_at = utcnow()

    def finish(self, tenant_id: str, session_id: str, reason: str, detail: str | None) -> None:
        """Mark the session finished; the first reason wins, later calls change nothing."""
        with self.db.write() as session:
            row = session.get(SessionRow, session_id)
            if row is None or row.tenant_id != tenant_id:
                raise NotFoundError(f"unknown session_id {session_id!r}")
            if row.finished_at is None:
                row.finished_at = utcnow()
                row.finish_reason = reason
                row.finish_detail = detail
