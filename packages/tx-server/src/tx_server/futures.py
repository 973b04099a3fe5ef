"""The API side of the futures protocol: submit at once, long-poll until woken (spec §3).

Submission writes one ``futures`` row and returns its ``request_id`` without waiting for any
work. Idempotency follows spec §3.8: a re-POST with the same key — ``(model_id, seq_id)``,
``(sampling_session_id, seq_id)`` or ``(session_id, model_seq_id)`` — returns the original
request id; only the request *type* is compared (the SDK's unnamed-save retry sends a changed
payload under the same key).

``retrieve_future`` never sleep-polls: a poll registers an :class:`asyncio.Event` in
:class:`CompletionWaiters`, re-reads the row, and sleeps on the event. The worker's commit
publishes the request id on :data:`tx_server.wake.FUTURES`, whose subscription (started by the
app) sets the event. The wait is cut every ``recheck`` seconds for a safety re-read, so a lost
wake-up delays an answer by at most that much; after ``timeout`` the poll ends in 408
(:class:`~tx_server.errors.PollTimeoutError`), which the SDK re-polls at once.

Backpressure: with a limit on unfinished requests (per tenant and/or global), a *new*
submission over the limit raises :class:`BackpressureError`, answered 429 with ``Retry-After``;
every SDK submission path retries 429 with the same key (spec §1.6, §4.3). Duplicates of
earlier submissions and requests failed on arrival are never refused: they add no work.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, cast

import anyio.to_thread
from sqlalchemy import Connection, Select, Table, bindparam, func, insert, select
from sqlalchemy.exc import IntegrityError

from tx_server.db.database import Database
from tx_server.db.models import FutureRow, FutureStatus, ModelRow, SessionRow, utcnow
from tx_server.errors import (
    BadRequestError,
    NotFoundError,
    PollTimeoutError,
    TxServerError,
    WireCategory,
)
from tx_server.wake import WORK, WakeBus

__all__ = [
    "BARRIER_TYPES",
    "JSON",
    "PROTOBUF",
    "BackpressureError",
    "BackpressureLimits",
    "CompletionWaiters",
    "FutureOutcome",
    "FutureStore",
    "ModelOwner",
    "RequestType",
    "Submission",
    "await_outcome",
]

JSON = "application/json"
PROTOBUF = "application/x-protobuf"


class RequestType(enum.StrEnum):
    """Queued request kinds (the body's ``type`` literal; ``forward`` = forward-only fwd/bwd)."""

    CREATE_MODEL = "create_model"
    FORWARD = "forward"
    FORWARD_BACKWARD = "forward_backward"
    OPTIM_STEP = "optim_step"
    SAVE_WEIGHTS = "save_weights"
    SAVE_WEIGHTS_FOR_SAMPLER = "save_weights_for_sampler"
    SAVE_WEIGHTS_EXTERNAL = "save_weights_external"
    LOAD_WEIGHTS = "load_weights"
    SAMPLE = "sample"
    CREATE_CUSTOM_LOSS = "create_custom_loss"
    UNLOAD_MODEL = "unload_model"


BARRIER_TYPES = frozenset(
    {
        RequestType.CREATE_MODEL,
        RequestType.OPTIM_STEP,
        RequestType.SAVE_WEIGHTS,
        RequestType.SAVE_WEIGHTS_FOR_SAMPLER,
        RequestType.SAVE_WEIGHTS_EXTERNAL,
        RequestType.LOAD_WEIGHTS,
        RequestType.UNLOAD_MODEL,
    }
)
"""Requests that read or replace a model's weights/optimizer state: each one waits for every
earlier request of its model and holds back every later one. Forward/backward passes between
two barriers commute (gradients add up), so the worker may run and batch them together."""


UNFINISHED = (FutureStatus.PENDING, FutureStatus.RUNNING)

# The hot statements, built once (see tx_server.db.database on why Core, not the ORM).
_TABLE = cast(Table, FutureRow.__table__)
_F = _TABLE.c
_KEY_COLUMNS = (_F.request_id, _F.request_type, _F.tenant_id)
_BY_MODEL_SEQ = select(*_KEY_COLUMNS).where(
    _F.model_id == bindparam("model_id"), _F.seq_id == bindparam("seq_id")
)
_BY_SAMPLER_SEQ = select(*_KEY_COLUMNS).where(
    _F.sampling_session_id == bindparam("sampler"), _F.seq_id == bindparam("seq_id")
)
_BY_SESSION_SEQ = select(*_KEY_COLUMNS).where(
    _F.session_id == bindparam("session_id"), _F.model_seq_id == bindparam("seq")
)
_INSERT = insert(_TABLE)
_MODELS_TABLE = cast(Table, ModelRow.__table__)
_MODELS = _MODELS_TABLE.c
_SESSIONS_TABLE = cast(Table, SessionRow.__table__)
_SESSIONS = _SESSIONS_TABLE.c
# Ownership and the session's liveness in one primary-key join: this is every training step's
# path, so a finished session costs no extra round trip to detect.
_MODEL_OWNER = (
    select(
        _MODELS.tenant_id,
        _MODELS.session_id,
        _SESSIONS.finished_at,
        _SESSIONS.last_heartbeat_at,
    )
    .select_from(_MODELS_TABLE.outerjoin(_SESSIONS_TABLE, _SESSIONS.id == _MODELS.session_id))
    .where(_MODELS.id == bindparam("model_id"))
)
_UNFINISHED_COUNT = select(func.count()).select_from(_TABLE).where(_F.status.in_(UNFINISHED))


class BackpressureError(TxServerError):
    """Too many unfinished requests: answered 429 + ``Retry-After``, which the SDK retries.

    Deliberately not in :data:`tx_server.errors.ERROR_TABLE` (429 is *only* correct for this
    transient condition); the API layer maps it and adds the header.
    """

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class BackpressureLimits:
    """Caps on unfinished (pending or running) requests; None = unlimited."""

    per_tenant: int | None = None
    total: int | None = None
    retry_after: float = 1.0


@dataclass(frozen=True)
class Submission:
    """One request to enqueue. Fill the key fields that identify it for idempotency."""

    request_type: RequestType
    payload: bytes
    payload_content_type: str = JSON
    session_id: str | None = None
    model_id: str | None = None
    seq_id: int | None = None
    model_seq_id: int | None = None
    sampling_session_id: str | None = None
    failed: tuple[str, WireCategory] | None = None
    """Set to ``(message, category)`` to record a request that is rejected on arrival (e.g. an
    undecodable body): the row is written ``failed`` at once, so its poll reports the error."""

    def idempotency_key(self) -> tuple[Select[Any], dict[str, object]] | None:
        """The query (and its parameters) finding an earlier row with the same key, or None."""
        if self.model_id is not None and self.seq_id is not None:
            return _BY_MODEL_SEQ, {"model_id": self.model_id, "seq_id": self.seq_id}
        if self.sampling_session_id is not None and self.seq_id is not None:
            return _BY_SAMPLER_SEQ, {"sampler": self.sampling_session_id, "seq_id": self.seq_id}
        if self.session_id is not None and self.model_seq_id is not None:
            return _BY_SESSION_SEQ, {"session_id": self.session_id, "seq": self.model_seq_id}
        return None


@dataclass(frozen=True)
class ModelOwner:
    """A model's tenant and session, with what decides whether the session still runs."""

    tenant_id: str
    session_id: str
    session_finished_at: datetime | None
    session_last_heartbeat_at: datetime | None


@dataclass(frozen=True)
class FutureOutcome:
    """A finished request as the poller sees it."""

    request_id: str
    status: FutureStatus
    result: bytes | None
    result_content_type: str | None
    error_message: str | None
    error_category: str | None


_OUTCOME = select(*(_F[f.name] for f in fields(FutureOutcome))).where(
    _F.request_id == bindparam("request_id"), _F.tenant_id == bindparam("tenant_id")
)


class FutureStore:
    """Synchronous database operations of the API process (run them in a worker thread)."""

    def __init__(
        self, db: Database, bus: WakeBus, limits: BackpressureLimits | None = None
    ) -> None:
        self.db = db
        self.bus = bus
        self.limits = limits if limits is not None else BackpressureLimits()

    def submit(self, tenant_id: str, submission: Submission) -> str:
        """Enqueue ``submission`` (or find its earlier copy) and return the request id."""
        try:
            return self._submit_once(tenant_id, submission)
        except IntegrityError:
            # A concurrent duplicate won the race (PostgreSQL); the retry finds its row.
            return self._submit_once(tenant_id, submission)

    def _submit_once(self, tenant_id: str, submission: Submission) -> str:
        key = submission.idempotency_key()
        with self.db.core_write() as tx:
            if key is not None:
                earlier = tx.conn.execute(*key).first()
                if earlier is not None:
                    return _check_duplicate(tenant_id, submission, *earlier)
            if submission.failed is None:
                self._check_capacity(tx.conn, tenant_id)
            request_id = str(uuid.uuid4())
            row: dict[str, object] = {
                "request_id": request_id,
                "tenant_id": tenant_id,
                "request_type": submission.request_type.value,
                "session_id": submission.session_id,
                "model_id": submission.model_id,
                "seq_id": submission.seq_id,
                "model_seq_id": submission.model_seq_id,
                "sampling_session_id": submission.sampling_session_id,
                "barrier": submission.request_type in BARRIER_TYPES,
                "payload": submission.payload,
                "payload_content_type": submission.payload_content_type,
                "status": FutureStatus.PENDING,
            }
            if submission.failed is not None:
                message, category = submission.failed
                row |= {
                    "status": FutureStatus.FAILED,
                    "error_message": message,
                    "error_category": category,
                    "finished_at": utcnow(),
                }
            tx.conn.execute(_INSERT, row)
            if submission.failed is None:
                self.bus.publish(tx, WORK, submission.model_id or "")
            return request_id

    def find_duplicate(self, tenant_id: str, submission: Submission) -> str | None:
        """The request id of an earlier submission with the same key, None if there is none."""
        key = submission.idempotency_key()
        if key is None:
            return None
        with self.db.core_read() as conn:
            earlier = conn.execute(*key).first()
        return None if earlier is None else _check_duplicate(tenant_id, submission, *earlier)

    def _check_capacity(self, conn: Connection, tenant_id: str) -> None:
        """BackpressureError when one more unfinished request would exceed a limit.

        Counted inside the writing transaction; concurrent submissions may overshoot by the
        number of API threads, which is fine for a throttle.
        """
        limits = self.limits
        if limits.per_tenant is not None:
            mine = conn.scalar(_UNFINISHED_COUNT.where(_F.tenant_id == tenant_id)) or 0
            if mine >= limits.per_tenant:
                raise BackpressureError(
                    f"{mine} requests of this API key are unfinished (limit "
                    f"max_pending_futures_per_tenant={limits.per_tenant}); retry later",
                    limits.retry_after,
                )
        if limits.total is not None:
            total = conn.scalar(_UNFINISHED_COUNT) or 0
            if total >= limits.total:
                raise BackpressureError(
                    f"the server has {total} unfinished requests (limit "
                    f"max_pending_futures={limits.total}); retry later",
                    limits.retry_after,
                )

    def model_owner(self, model_id: str) -> ModelOwner | None:
        """Who owns ``model_id`` and whether its session still runs; None if it is unknown."""
        with self.db.core_read() as conn:
            row = conn.execute(_MODEL_OWNER, {"model_id": model_id}).first()
        return None if row is None else ModelOwner(*row)

    def outcome(self, tenant_id: str, request_id: str) -> FutureOutcome | None:
        """The finished outcome, None while pending/running; NotFoundError if absent."""
        with self.db.core_read() as conn:
            row = conn.execute(_OUTCOME, {"request_id": request_id, "tenant_id": tenant_id}).first()
        if row is None:
            raise NotFoundError(f"unknown request_id {request_id!r}")
        if row.status in UNFINISHED:
            return None
        return FutureOutcome(**row._asdict())


def _check_duplicate(
    tenant_id: str, submission: Submission, request_id: str, request_type: str, owner: str
) -> str:
    if owner != tenant_id:
        raise BadRequestError("this request key belongs to another tenant's session")
    if request_type != submission.request_type.value:
        field, scope = _key_words(submission)
        raise BadRequestError(
            f"{field} was already used by a {request_type!r} request {scope}, "
            f"not {submission.request_type.value!r}"
        )
    return request_id


def _key_words(submission: Submission) -> tuple[str, str]:
    """The idempotency key of ``submission`` in words: the number, and what it numbers within
    (checked in the order of :meth:`Submission.idempotency_key`)."""
    if submission.model_id is not None and submission.seq_id is not None:
        return f"seq_id {submission.seq_id}", f"of model {submission.model_id!r}"
    if submission.sampling_session_id is not None and submission.seq_id is not None:
        return (
            f"seq_id {submission.seq_id}",
            f"of sampling session {submission.sampling_session_id!r}",
        )
    return f"model_seq_id {submission.model_seq_id}", f"of session {submission.session_id!r}"


class CompletionWaiters:
    """Events of the polls waiting in this process, keyed by request id (one event loop)."""

    def __init__(self) -> None:
        self._events: dict[str, set[asyncio.Event]] = {}

    def wake(self, request_id: str) -> None:
        """Wake every poll of ``request_id`` (called from the FUTURES subscription)."""
        for ev in self._events.get(request_id, ()):
            ev.set()

    @contextlib.contextmanager
    def watch(self, request_id: str) -> Iterator[asyncio.Event]:
        """Register an event for ``request_id`` for the duration of the block."""
        ev = asyncio.Event()
        self._events.setdefault(request_id, set()).add(ev)
        try:
            yield ev
        finally:
            events = self._events[request_id]
            events.discard(ev)
            if not events:
                del self._events[request_id]

    def __len__(self) -> int:
        return sum(len(v) for v in self._events.values())


async def await_outcome(
    store: FutureStore,
    waiters: CompletionWaiters,
    tenant_id: str,
    request_id: str,
    *,
    timeout: float,
    recheck: float,
) -> FutureOutcome:
    """Long-poll one request: its outcome, or PollTimeoutError after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    with waiters.watch(request_id) as woken:
        while True:
            woken.clear()  # cleared *before* the read, so a wake during the read is kept
            outcome = await anyio.to_thread.run_sync(store.outcome, tenant_id, request_id)
            if outcome is not None:
                return outcome
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise PollTimeoutError(f"request {request_id} is still pending; poll again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), min(recheck, remaining))
