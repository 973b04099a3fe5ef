"""The worker side of the futures queue: claim in per-model order, complete, fail, prune.

The worker is a separate process that shares only the database (and the wake-up bus) with
the API. Its loop is::

    queue = WorkQueue(db)
    queue.fail_running(RESTART_MESSAGE)  # crash recovery: what the dead worker ran fails
    with queue.subscribe_work() as work:
        while True:
            for req in queue.claim_pending(limit=64):
                try:
                    queue.complete(req.request_id, result_bytes, PROTOBUF)
                except Exception as e:
                    queue.fail_claimed(req, e, category_of(e))
            work.wait(timeout=1.0)       # woken by each submission; 1 s safety re-check

Ordering (spec §3.8): requests of one model are taken in arrival order. A *barrier*
(``optim_step``, saves, loads, ``create_model``; see :data:`~tx_server.futures.BARRIER_TYPES`)
is claimed only when nothing earlier of its model is pending or running, and nothing later of
its model is claimed until it finishes. Forward/backward passes between barriers are claimed
together, so the worker can batch them across models and tenants. The worker claims
``through_barriers``: a model with nothing running hands over its whole pending prefix —
passes and barriers — in one claim, which the worker executes in order; this is the same order,
one claim instead of one per segment for a client that pipelines. Requests without a model
(sampling) are independent. Claiming is serialized (``BEGIN IMMEDIATE`` on SQLite, an
advisory transaction lock on PostgreSQL), so two workers never claim the same row.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    Delete,
    Table,
    and_,
    bindparam,
    delete,
    func,
    or_,
    select,
    update,
)

from tx_server.db.database import Database
from tx_server.db.models import FutureRow, FutureStatus, ModelRow, utcnow
from tx_server.errors import NotFoundError, ServerFaultError, WireCategory, failure_message
from tx_server.futures import JSON, PROTOBUF
from tx_server.wake import FUTURES, WORK, SyncSubscription, WakeBus, wake_bus_for

__all__ = ["KEPT_TYPES", "RESTART_MESSAGE", "ClaimedRequest", "WorkQueue", "prune_finished"]

log = logging.getLogger(__name__)

_CLAIM_LOCK_KEY = 0x7478_5155  # "txQU": the advisory lock that serializes claims on PostgreSQL
_RESULT_TYPES = (JSON, PROTOBUF)
_DONE = (FutureStatus.COMPLETED, FutureStatus.FAILED)
RESTART_MESSAGE = "the worker restarted while this request ran; resubmit it"
KEPT_TYPES = ("unload_model",)
"""Finished requests that are never pruned: a completed ``unload_model`` is the durable record
that its model is gone (see :mod:`tx_server.worker.recovery`), and each one is a few bytes."""


# The hot statements, built once (see tx_server.db.database on why Core, not the ORM).
_TABLE = cast(Table, FutureRow.__table__)
_F = _TABLE.c
_MODELS = cast(Table, ModelRow.__table__)
_RUNNING_MODELS = select(_F.model_id, _F.barrier).where(
    _F.status == FutureStatus.RUNNING, _F.model_id.is_not(None)
)
_PENDING_WINDOW = (
    select(_F.id, _F.model_id, _F.barrier, _F.request_type)
    .where(_F.status == FutureStatus.PENDING)
    .order_by(_F.id)
    .limit(bindparam("window"))
)
_MARK_RUNNING = update(_TABLE).values(
    status=FutureStatus.RUNNING, started_at=bindparam("claimed_at")
)
_FINISH = (
    update(_TABLE)
    .where(_F.request_id == bindparam("rid"), _F.status.not_in(_DONE))
    .values(
        finished_at=bindparam("done_at"),
        status=bindparam("new_status"),
        result=bindparam("new_result", None),
        result_content_type=bindparam("new_result_type", None),
        error_message=bindparam("new_error", None),
        error_category=bindparam("new_category", None),
    )
)


@dataclass(frozen=True)
class ClaimedRequest:
    """A request the worker now owns (status ``running``)."""

    request_id: str
    request_type: str
    tenant_id: str
    session_id: str | None
    model_id: str | None
    seq_id: int | None
    model_seq_id: int | None
    sampling_session_id: str | None
    barrier: bool
    payload: bytes
    payload_content_type: str
    created_at: datetime


_CLAIMED = select(*(_F[f.name] for f in fields(ClaimedRequest)))


@dataclass
class _ModelState:
    running: bool = False
    running_barrier: bool = False
    seen_pending: bool = False
    blocked: bool = False


class WorkQueue:
    """Worker-side access to the queue; every method is one short transaction."""

    def __init__(self, db: Database, bus: WakeBus | None = None) -> None:
        self.db = db
        self.bus = bus if bus is not None else wake_bus_for(db)

    def subscribe_work(self) -> SyncSubscription:
        """A blocking subscription woken by every submission (message: the model id or "")."""
        return self.bus.subscribe(WORK)

    def claim_pending(
        self,
        limit: int = 256,
        request_types: Collection[str] | None = None,
        window: int = 4096,
        through_barriers: bool = False,
    ) -> list[ClaimedRequest]:
        """Mark up to ``limit`` runnable pending requests ``running`` and return them in order.

        ``request_types`` restricts what is claimed (e.g. only sampling) without breaking the
        per-model order; ``window`` bounds how many pending rows one call inspects.
        ``through_barriers``: a model with nothing running gives *all* its pending requests, in
        order, barriers included; the caller then owns their order and must execute each
        model's requests in the order returned (the worker does, in rounds: see
        :func:`tx_server.worker.rounds.plan_rounds`). One claim then carries a pipelining
        client's whole backlog instead of one segment per claim.
        """
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        with self.db.core_write() as tx:
            conn = tx.conn
            if self.db.is_postgresql:
                conn.execute(select(func.pg_advisory_xact_lock(_CLAIM_LOCK_KEY)))
            states = _running_states(conn)
            pending = conn.execute(_PENDING_WINDOW, {"window": window}).all()
            chosen = _select_runnable(pending, states, limit, request_types, through_barriers)
            if not chosen:
                return []
            ids = [r.id for r in chosen]
            conn.execute(_MARK_RUNNING.where(_F.id.in_(ids)), {"claimed_at": utcnow()})
            rows = conn.execute(_CLAIMED.where(_F.id.in_(ids)).order_by(_F.id)).all()
            return [ClaimedRequest(**r._asdict()) for r in rows]

    def complete(self, request_id: str, payload: bytes, content_type: str) -> None:
        """Store the result (JSON or protobuf bytes) and wake the request's pollers."""
        _check_content_type(content_type)
        self._finish(
            request_id,
            new_status=FutureStatus.COMPLETED,
            new_result=payload,
            new_result_type=content_type,
        )

    def complete_many(self, results: Sequence[tuple[str, bytes, str]]) -> None:
        """:meth:`complete` for each ``(request_id, payload, content_type)``, in one transaction.

        A fused engine call finishes many requests at once; one commit (one fsync of the WAL)
        for all of them instead of one each. Every result is stored even if one of them names a
        request that is unknown or already finished, which is raised after the commit.
        """
        if not results:
            return
        for _, _, content_type in results:
            _check_content_type(content_type)
        missed: list[str] = []
        with self.db.core_write() as tx:
            done_at = utcnow()
            for request_id, payload, content_type in results:
                values = {"new_status": FutureStatus.COMPLETED, "new_result": payload}
                values["new_result_type"] = content_type
                finish = {"rid": request_id, "done_at": done_at, **values}
                if tx.conn.execute(_FINISH, finish).rowcount == 0:
                    missed.append(request_id)
                else:
                    self.bus.publish(tx, FUTURES, request_id)
        if missed:
            raise ServerFaultError(f"requests {missed} were unknown or already finished")

    def fail(self, request_id: str, message: str, category: WireCategory) -> None:
        """Record a terminal failure (``user`` / ``server`` / ``unknown``) and wake pollers.

        A failed model-creating request (``create_model``, or ``load_weights`` creating a run)
        also removes the run's ``models`` row, which the API wrote on arrival: the model never
        existed, so ``get_info`` and the training-run listing must not show it.
        """
        if category not in ("user", "server", "unknown"):
            raise ValueError(f"category must be user, server or unknown, got {category!r}")
        self._finish(
            request_id,
            new_status=FutureStatus.FAILED,
            new_error=message or "request failed",
            new_category=category,
            drop_uncreated=True,
        )

    def fail_claimed(
        self, request: ClaimedRequest, error: BaseException, category: WireCategory
    ) -> None:
        """Fail a claimed ``request`` because of ``error``: the message its owner reads
        (:func:`~tx_server.errors.failure_message`), and the traceback in the log when the
        fault is the server's."""
        if category == "server":
            log.error(
                "request %s (%s) failed", request.request_id, request.request_type, exc_info=error
            )
        self.fail(request.request_id, failure_message(error), category)

    def _finish(self, request_id: str, *, drop_uncreated: bool = False, **values: object) -> None:
        with self.db.core_write() as tx:
            done = tx.conn.execute(
                _FINISH, {"rid": request_id, "done_at": utcnow(), **values}
            ).rowcount
            if done == 0:
                exists = tx.conn.scalar(select(_F.status).where(_F.request_id == request_id))
                if exists is None:
                    raise NotFoundError(f"unknown request_id {request_id!r}")
                raise ServerFaultError(f"request {request_id} already finished ({exists})")
            if drop_uncreated:
                tx.conn.execute(_drop_uncreated_models(_F.request_id == request_id))
            self.bus.publish(tx, FUTURES, request_id)

    def fail_running(self, message: str = RESTART_MESSAGE) -> int:
        """Fail every ``running`` request with category ``server`` (call once at worker start).

        Why fail rather than re-run: a request that was running when its worker died may have
        half-applied (an optim_step's update, a save's files), and the client is told plainly to
        resubmit. Pending requests are untouched and run as usual.
        """
        with self.db.write() as session:
            ids = session.scalars(
                select(FutureRow.request_id).where(FutureRow.status == FutureStatus.RUNNING)
            ).all()
            if ids:
                session.execute(
                    update(FutureRow)
                    .where(FutureRow.request_id.in_(ids))
                    .values(
                        status=FutureStatus.FAILED,
                        error_message=message,
                        error_category="server",
                        finished_at=utcnow(),
                    )
                )
                session.execute(_drop_uncreated_models(FutureRow.request_id.in_(ids)))
                for request_id in ids:
                    self.bus.publish(session, FUTURES, request_id)
            return len(ids)


def _drop_uncreated_models(which: ColumnElement[bool]) -> Delete:
    """Delete the ``models`` rows of the model-creating requests among ``which``."""
    creating = or_(
        _F.request_type == "create_model",
        and_(_F.request_type == "load_weights", _F.model_seq_id.is_not(None)),
    )
    created_by = select(_F.model_id).where(which, creating, _F.model_id.is_not(None))
    return delete(_MODELS).where(_MODELS.c.id.in_(created_by))


def _check_content_type(content_type: str) -> None:
    if content_type not in _RESULT_TYPES:
        raise ValueError(f"content_type must be one of {_RESULT_TYPES}, got {content_type!r}")


def _running_states(conn: Connection) -> dict[str, _ModelState]:
    states: dict[str, _ModelState] = {}
    for model_id, barrier in conn.execute(_RUNNING_MODELS):
        state = states.setdefault(str(model_id), _ModelState())
        state.running = True
        state.running_barrier |= barrier
    return states


def _select_runnable(
    pending: Collection[Any],
    states: dict[str, _ModelState],
    limit: int,
    request_types: Collection[str] | None,
    through_barriers: bool = False,
) -> list[Any]:
    """Walk pending rows in arrival order and pick those the ordering rules allow."""
    chosen: list[Any] = []
    for row in pending:
        if len(chosen) >= limit:
            break
        wanted = request_types is None or row.request_type in request_types
        if row.model_id is None:
            if wanted:
                chosen.append(row)
            continue
        state = states.setdefault(row.model_id, _ModelState())
        if through_barriers and not state.running:
            # The claim takes this model's prefix in order; an unwanted type ends the prefix.
            if wanted and not state.blocked:
                chosen.append(row)
            else:
                state.blocked = True
            continue
        if row.barrier:
            if wanted and not (state.running or state.seen_pending or state.blocked):
                chosen.append(row)
            state.blocked = True  # nothing after a barrier runs before it finishes
        elif wanted and not (state.running_barrier or state.blocked):
            chosen.append(row)
        state.seen_pending = True
    return chosen


def prune_finished(db: Database, retention: timedelta) -> int:
    """Delete completed/failed futures finished more than ``retention`` ago; return the count."""
    cutoff = utcnow() - retention
    with db.write() as session:
        result = session.execute(
            delete(FutureRow).where(
                FutureRow.status.in_(_DONE),
                FutureRow.finished_at < cutoff,
                FutureRow.request_type.not_in(KEPT_TYPES),
            )
        )
        count: int = result.rowcount  # type: ignore[attr-defined]
        return count
