"""Client sessions: create (idempotent per transport retry), heartbeat, finish (first wins).

A finished session answers heartbeats with 410, which stops the SDK's heartbeat loop (spec
§4.6), and new work on its models and samplers with 410 too (spec §4.1, §10 case 15): the SDK
raises a 410 on a submission at once, without retrying. Requests accepted before the finish
are not withdrawn, and their outcomes stay retrievable. Sessions of another tenant are
reported as absent (404), never as forbidden, so ids leak nothing.

Expiry: a session without a heartbeat for ``timeout_seconds`` is finished with reason
``expired`` — by the API's maintenance task (:meth:`SessionService.expire_stale`) and, so the
answer never depends on that task's timing, lazily by any heartbeat or new work that arrives
too late. The worker frees the adapter slots of models whose session is finished; finishing
is the only thing expiry has to do. The SDK heartbeats every 10 s, so a timeout of minutes
only ends sessions whose client is gone.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import String, Table, select, update
from sqlalchemy.exc import IntegrityError

from tx_server.db.database import Database
from tx_server.db.models import ModelRow, SamplingSessionRow, SessionRow, utcnow
from tx_server.errors import BadRequestError, NotFoundError, SessionFinishedError

__all__ = ["EXPIRED", "SessionService", "check_storable"]

EXPIRED = "expired"
"""``finish_reason`` of a session ended by the server for lack of heartbeats."""


def _expired_detail(timeout: timedelta) -> str:
    return f"no heartbeat for {timeout.total_seconds():g} s"


def check_storable(table: Any, column: str, value: str | None, field: str | None = None) -> None:
    """BadRequestError unless ``value`` fits the String column ``table.c[column]``.

    Why here and not left to the database: PostgreSQL refuses a string over a VARCHAR's length
    or one holding a NUL character, SQLite stores both. Checking in the API gives both backends
    the same answer, a 400 that names the field, instead of a PostgreSQL-only 500 that the SDK
    retries for minutes.
    """
    if value is None:
        return
    name = field or column
    limit = cast(String, cast(Table, table).c[column].type).length
    if limit is not None and len(value) > limit:
        raise BadRequestError(f"{name} is {len(value)} characters long; at most {limit} allowed")
    if "\x00" in value:
        raise BadRequestError(f"{name} contains a NUL character")


def _finished_message(row: SessionRow) -> str:
    detail = f" ({row.finish_detail})" if row.finish_detail else ""
    return f"session {row.id} is finished: {row.finish_reason}{detail}"


class SessionService:
    """Synchronous session operations (FastAPI runs them in its thread pool)."""

    def __init__(self, db: Database, *, timeout_seconds: float | None = None) -> None:
        """``timeout_seconds`` None: sessions never expire."""
        self.db = db
        self.timeout = timedelta(seconds=timeout_seconds) if timeout_seconds else None

    def _expire_if_stale(self, row: SessionRow, now: datetime) -> None:
        if row.finished_at is None and self.timeout and row.last_heartbeat_at < now - self.timeout:
            row.finished_at = now
            row.finish_reason = EXPIRED
            row.finish_detail = _expired_detail(self.timeout)

    def expire_stale(self) -> int:
        """Finish every session whose last heartbeat is older than the timeout; the count."""
        if self.timeout is None:
            return 0
        now = utcnow()
        with self.db.write() as session:
            result = session.execute(
                update(SessionRow)
                .where(
                    SessionRow.finished_at.is_(None),
                    SessionRow.last_heartbeat_at < now - self.timeout,
                )
                .values(
                    finished_at=now,
                    finish_reason=EXPIRED,
                    finish_detail=_expired_detail(self.timeout),
                )
            )
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

    def get_active(self, tenant_id: str, session_id: str) -> SessionRow:
        """The tenant's unfinished session (expiring it if stale); 410 once finished."""
        with self.db.write() as session:
            row = session.get(SessionRow, session_id)
            if row is None or row.tenant_id != tenant_id:
                raise NotFoundError(f"unknown session_id {session_id!r}")
            self._expire_if_stale(row, utcnow())
        if row.finished_at is not None:  # raised after the commit, so an expiry sticks
            raise SessionFinishedError(_finished_message(row))
        return row

    def may_have_ended(
        self, finished_at: datetime | None, last_heartbeat_at: datetime | None
    ) -> bool:
        """Whether a session with these column values is finished or past its timeout.

        No query: callers read the two columns along with what they look up anyway (the
        submission paths join them to the model or sampler), and call :meth:`get_active` only
        when this is true, which settles it (and records an expiry).
        """
        if finished_at is not None:
            return True
        if self.timeout is None or last_heartbeat_at is None:
            return False
        return last_heartbeat_at < utcnow() - self.timeout

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
        """A new session id; a transport retry (same ``X-Idempotency-Key``) gets the same id.

        On PostgreSQL a retry that races its original loses on the unique key; it then finds
        the original's row (SQLite serializes the two writes instead).
        """
        table = SessionRow.__table__
        check_storable(table, "sdk_version", sdk_version)
        check_storable(table, "project_id", project_id)
        check_storable(table, "display_name", display_name)
        check_storable(table, "idempotency_key", idempotency_key, "X-Idempotency-Key")
        values: dict[str, Any] = {
            "tags": list(tags),
            "user_metadata": dict(user_metadata),
            "sdk_version": sdk_version,
            "project_id": project_id,
            "display_name": display_name,
        }
        try:
            return self._create_once(tenant_id, idempotency_key, values)
        except IntegrityError:
            if idempotency_key is None:
                raise
            return self._create_once(tenant_id, idempotency_key, values)

    def _create_once(
        self, tenant_id: str, idempotency_key: str | None, values: dict[str, Any]
    ) -> str:
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
                **values,
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

    def list_ids(self, tenant_id: str, limit: int, offset: int) -> list[str]:
        """One page of the tenant's session ids, newest first (``RestClient.list_sessions``)."""
        with self.db.read() as session:
            return list(
                session.scalars(
                    select(SessionRow.id)
                    .where(SessionRow.tenant_id == tenant_id)
                    .order_by(SessionRow.created_at.desc(), SessionRow.id)
                    .limit(limit)
                    .offset(offset)
                )
            )

    def members(self, session_id: str) -> tuple[list[str], list[str]]:
        """The ids of the session's training runs and of its samplers, each in creation order
        (``RestClient.get_session``)."""
        with self.db.read() as session:
            runs = session.scalars(
                select(ModelRow.id)
                .where(ModelRow.session_id == session_id)
                .order_by(ModelRow.model_seq_id)
            )
            samplers = session.scalars(
                select(SamplingSessionRow.id)
                .where(SamplingSessionRow.session_id == session_id)
                .order_by(SamplingSessionRow.sampling_session_seq_id)
            )
            return list(runs), list(samplers)

    def heartbeat(self, tenant_id: str, session_id: str) -> None:
        """Record liveness; SessionFinishedError (410) once the session is finished."""
        with self.db.write() as session:
            row = session.get(SessionRow, session_id)
            if row is None or row.tenant_id != tenant_id:
                raise NotFoundError(f"unknown session_id {session_id!r}")
            now = utcnow()
            self._expire_if_stale(row, now)
            if row.finished_at is None:
                row.last_heartbeat_at = now
        if row.finished_at is not None:  # raised after the commit, so an expiry sticks
            raise SessionFinishedError(_finished_message(row))

    def finish(self, tenant_id: str, session_id: str, reason: str, detail: str | None) -> None:
        """Mark the session finished; the first reason wins, later calls change nothing.

        NUL characters are dropped from ``detail`` (free text that PostgreSQL cannot store):
        a session must be finishable whatever the client wrote there.
        """
        if detail is not None:
            detail = detail.replace("\x00", "")
        with self.db.write() as session:
            row = session.get(SessionRow, session_id)
            if row is None or row.tenant_id != tenant_id:
                raise NotFoundError(f"unknown session_id {session_id!r}")
            if row.finished_at is None:
                row.finished_at = utcnow()
                row.finish_reason = reason
                row.finish_detail = detail
