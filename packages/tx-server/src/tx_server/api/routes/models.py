"""Training-model endpoints: ``create_model``, ``get_info``, ``unload_model`` (spec §4.1).

``create_model`` writes the ``models`` row at once (so ``get_info`` answers as soon as the
future resolves) and queues a barrier request on which the worker allocates the adapter slot.
A bad base model, rank or LoRA config is recorded as a failed future with category ``user``
before any row is written: the SDK then raises ``RequestFailedError`` instead of retrying a 4xx.
A creation that the worker fails removes its run again, so no ghost run is listed.
Work on a model whose session is finished is refused with 410 (:func:`require_live_session`).
"""

from __future__ import annotations

import json
from datetime import datetime

from fastapi import APIRouter
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from tx_server.api.deps import StateDep, TenantDep
from tx_server.api.state import AppState
from tx_server.db.models import FutureRow, ModelRow
from tx_server.errors import NotFoundError, WireCategory
from tx_server.futures import RequestType, Submission
from tx_types import (
    CreateModelRequest,
    GetInfoRequest,
    GetInfoResponse,
    ModelData,
    UnloadModelRequest,
    UnloadModelResponse,
    UntypedAPIFuture,
)

__all__ = [
    "created_before",
    "get_owned_model",
    "model_id_for",
    "require_live_session",
    "router",
    "submit",
    "submit_for_model",
]

router = APIRouter(tags=["models"])


def model_id_for(session_id: str, model_seq_id: int) -> str:
    """Training-run id of the ``model_seq_id``-th model of a session (spec §6.9)."""
    return f"{session_id}:train:{model_seq_id}"


def get_owned_model(state: AppState, tenant: str, model_id: str) -> ModelRow:
    """The caller's model row; NotFoundError for unknown and foreign ids alike."""
    with state.db.read() as session:
        row = session.get(ModelRow, model_id)
        if row is None or row.tenant_id != tenant:
            raise NotFoundError(f"unknown model_id {model_id!r}")
        return row


async def submit(
    state: AppState, tenant: str, submission: Submission, model_id: str | None = None
) -> UntypedAPIFuture:
    """Write the futures row (in the thread pool) and answer with its request id."""
    request_id = await run_in_threadpool(state.futures.submit, tenant, submission)
    return UntypedAPIFuture(request_id=request_id, model_id=model_id)


async def submit_for_model(
    state: AppState, tenant: str, submission: Submission, model_id: str
) -> UntypedAPIFuture:
    """:func:`submit` for a request on the caller's model ``model_id`` (404 if not theirs, 410
    once its session is finished: see :func:`require_live_session`).

    The checks and the write share one thread-pool call: this is every training step's path,
    and each hop costs more than the query. Ownership and the session's state are one joined
    primary-key lookup.
    """

    def check_and_submit() -> str:
        owner = state.futures.model_owner(model_id)
        if owner is None or owner.tenant_id != tenant:
            raise NotFoundError(f"unknown model_id {model_id!r}")
        require_live_session(
            state,
            tenant,
            submission,
            owner.session_id,
            owner.session_finished_at,
            owner.session_last_heartbeat_at,
        )
        return state.futures.submit(tenant, submission)

    request_id = await run_in_threadpool(check_and_submit)
    return UntypedAPIFuture(request_id=request_id, model_id=model_id)


def require_live_session(
    state: AppState,
    tenant: str,
    submission: Submission,
    session_id: str,
    finished_at: datetime | None,
    last_heartbeat_at: datetime | None,
) -> None:
    """SessionFinishedError (410, not retried by the SDK) for new work in a finished session.

    Spec §4.1 and §10 case 15: after ``sessions/{id}/finish`` (``ServiceClient.close()``), work
    on the session's models and samplers is refused. ``finished_at``/``last_heartbeat_at`` come
    with the caller's own lookup, so a live session costs no query; a re-POST of a request
    accepted before the finish (same idempotency key) still gets its original request id.
    """
    if not state.sessions.may_have_ended(finished_at, last_heartbeat_at):
        return
    if state.futures.find_duplicate(tenant, submission) is not None:
        return
    state.sessions.get_active(tenant, session_id)  # raises, expiring a timed-out session


def _create_problem(state: AppState, body: CreateModelRequest) -> str | None:
    if state.settings.served_base_model(body.base_model) is None:
        served = state.settings.base_models
        return f"base_model {body.base_model!r} is not served here; served models: {served}"
    rank = body.lora_config.rank if body.lora_config else 32
    max_rank = state.settings.engine.max_lora_rank
    if rank > max_rank:
        return f"lora_config.rank {rank} exceeds this server's max_lora_rank {max_rank}"
    lora = body.lora_config
    if lora is not None and not (lora.train_attn or lora.train_mlp or lora.train_unembed):
        return "lora_config: at least one of train_attn, train_mlp, train_unembed must be true"
    if body.optimizer_config.type != "adamw":
        return f"optimizer_config.type {body.optimizer_config.type!r}: only 'adamw' is supported"
    return None


def _register_model(state: AppState, tenant: str, body: CreateModelRequest, model_id: str) -> None:
    state.sessions.get_active(tenant, body.session_id)
    try:
        _insert_model(state, tenant, body, model_id)
    except IntegrityError:
        # PostgreSQL: a transport retry that raced its original lost on the primary key, and
        # now finds the original's row (SQLite serializes the two writes instead of failing).
        _insert_model(state, tenant, body, model_id)


def _insert_model(state: AppState, tenant: str, body: CreateModelRequest, model_id: str) -> None:
    with state.db.write() as session:
        if session.get(ModelRow, model_id) is not None:
            return  # a transport retry of the same create_model
        if created_before(session, body.session_id, body.model_seq_id):
            return  # ... of one that failed (its run was removed): the failure stands
        lora = body.lora_config.model_dump(mode="json") if body.lora_config else {"rank": 32}
        session.add(
            ModelRow(
                id=model_id,
                session_id=body.session_id,
                model_seq_id=body.model_seq_id,
                tenant_id=tenant,
                base_model=body.base_model,
                lora_config=lora,
                optimizer_config=body.optimizer_config.model_dump(mode="json"),
                user_metadata={k: str(v) for k, v in (body.user_metadata or {}).items()},
            )
        )


def created_before(session: Session, session_id: str, model_seq_id: int) -> bool:
    """Whether a model-creating request with this key was already submitted.

    A creation that fails removes its run (:meth:`tx_server.work_queue.WorkQueue.fail`); a
    re-POST of it must then get the original, failed request id without bringing the run back.
    """
    found = session.scalar(
        select(FutureRow.id).where(
            FutureRow.session_id == session_id, FutureRow.model_seq_id == model_seq_id
        )
    )
    return found is not None


@router.post("/create_model", response_model=UntypedAPIFuture)
async def create_model(
    body: CreateModelRequest, tenant: TenantDep, state: StateDep
) -> UntypedAPIFuture:
    """Queue a new LoRA training run ``{session_id}:train:{model_seq_id}``."""
    model_id = model_id_for(body.session_id, body.model_seq_id)
    problem = _create_problem(state, body)
    failed: tuple[str, WireCategory] | None = None
    if problem is not None:
        failed = (problem, "user")
    else:
        served = state.settings.served_base_model(body.base_model)
        body = body.model_copy(update={"base_model": served})
        await run_in_threadpool(_register_model, state, tenant, body, model_id)
    submission = Submission(
        RequestType.CREATE_MODEL,
        json.dumps(body.model_dump(mode="json")).encode(),
        session_id=body.session_id,
        model_seq_id=body.model_seq_id,
        model_id=None if failed else model_id,
        failed=failed,
    )
    return await submit(state, tenant, submission, None if failed else model_id)


@router.post("/get_info", response_model=GetInfoResponse, response_model_exclude_none=True)
async def get_info(body: GetInfoRequest, tenant: TenantDep, state: StateDep) -> GetInfoResponse:
    """Model facts the SDK caches; ``tokenizer_id`` is the served name, which loads offline."""
    row = await run_in_threadpool(get_owned_model, state, tenant, body.model_id)
    rank = int(row.lora_config.get("rank", 32))
    return GetInfoResponse(
        type="get_info",
        model_id=row.id,
        model_data=ModelData(model_name=row.base_model, tokenizer_id=row.base_model),
        is_lora=True,
        lora_rank=rank,
        model_name=row.base_model,
    )


@router.post("/unload_model", response_model=UnloadModelResponse)
async def unload_model(
    body: UnloadModelRequest, tenant: TenantDep, state: StateDep
) -> UnloadModelResponse:
    """Queue the unload as a barrier of its model and acknowledge at once (the SDK expects a
    synchronous answer). Earlier requests of the run still complete; the worker then frees the
    adapter slot, and the completed queue row is the durable record that the run is gone."""
    await run_in_threadpool(get_owned_model, state, tenant, body.model_id)
    payload = json.dumps(body.model_dump(mode="json")).encode()
    unload = Submission(RequestType.UNLOAD_MODEL, payload, model_id=body.model_id)
    await run_in_threadpool(state.futures.submit, tenant, unload)
    return UnloadModelResponse(model_id=body.model_id, type="unload_model")
