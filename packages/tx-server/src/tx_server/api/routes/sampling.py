"""Sampling: ``create_sampling_session``, ``GET samplers/{id}`` and ``asample`` (spec §4.1, §4.3).

A sampler is a row in ``sampling_sessions``: a base model and optionally a checkpoint
(``model_path``). ``asample`` resolves the sampler to the checkpoint's directory *now* and queues
that with the request, so the worker needs no lookups; the worker loads the directory into a
slot of its own (a frozen copy, see :mod:`tx_server.worker.sampling`).

A bad ``asample`` body (out-of-range sampling params, unknown sampler, options tx does not
implement) is answered with a future recorded as failed with category ``user``: the SDK sends
``asample`` without transport retries and would turn a 4xx into a generic error, whereas a
failed future raises ``RequestFailedError`` with the message. ``sample_sequence_ids`` are always
present (spec §0 item 4): ``{request_id}:{i}``, unique because request ids are, one per
requested sample (the SDK asserts as many as it gets sequences). ``num_samples`` is bounded by
``max_num_samples``: a larger request fails on arrival, as a user error naming ``num_samples``.
A sampler whose session is finished takes no new requests (410, spec §4.1).
"""

from __future__ import annotations

import json
from typing import Any, cast

from fastapi import APIRouter, Request
from pydantic import ValidationError
from sqlalchemy import Table, bindparam, select
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from tx_server.api.access import readable_checkpoint
from tx_server.api.deps import StateDep, TenantDep
from tx_server.api.routes.models import require_live_session
from tx_server.api.state import AppState
from tx_server.db.models import ModelRow, SamplingSessionRow, SessionRow
from tx_server.errors import BadRequestError, NotFoundError
from tx_server.futures import RequestType, Submission
from tx_server.settings import same_base_model
from tx_server.worker.storage import EPHEMERAL_PREFIX, checkpoint_dir, find_checkpoint
from tx_types import (
    CreateSamplingSessionRequest,
    CreateSamplingSessionResponse,
    GetSamplerResponse,
    SampleRequest,
    UntypedAPIFuture,
)
from tx_types.paths import ParsedCheckpointTinkerPath

__all__ = ["router"]

router = APIRouter(tags=["sampling"])


def _checkpoint_source(state: AppState, tenant: str, tinker_path: str) -> tuple[str, str]:
    """``(base_model, training_run_id)`` of a checkpoint the caller may read (else 404)."""
    with state.db.read() as session:
        row = readable_checkpoint(session, tenant, tinker_path)
        if row.checkpoint_type not in ("sampler", "training"):
            raise BadRequestError(f"{tinker_path!r} is not a sampler or training checkpoint")
        model = session.get(ModelRow, row.model_id)
        if model is None:
            raise NotFoundError(f"the training run of {tinker_path!r} no longer exists")
        return model.base_model, model.id


def _create_sampler(state: AppState, tenant: str, body: CreateSamplingSessionRequest) -> str:
    state.sessions.get_active(tenant, body.session_id)
    sampler_id = f"{body.session_id}:sample:{body.sampling_session_seq_id}"
    source = None
    base_model = body.base_model
    if body.model_path is not None:
        checkpoint_base, source = _checkpoint_source(state, tenant, body.model_path)
        if base_model is not None and not same_base_model(base_model, checkpoint_base):
            raise BadRequestError(
                f"base_model {base_model!r} does not match the checkpoint's {checkpoint_base!r}"
            )
        base_model = checkpoint_base
    assert base_model is not None  # the request model requires one of the two
    served = state.settings.served_base_model(base_model)
    if served is None:
        raise BadRequestError(
            f"base_model {base_model!r} is not served; served: {state.settings.base_models}"
        )
    base_model = served
    values: dict[str, Any] = {
        "id": sampler_id,
        "session_id": body.session_id,
        "sampling_session_seq_id": body.sampling_session_seq_id,
        "tenant_id": tenant,
        "base_model": base_model,
        "model_path": body.model_path,
        "source_model_id": source,
    }
    try:
        _insert_sampler(state, values)
    except IntegrityError:
        # PostgreSQL: a transport retry that raced its original lost on the primary key, and
        # now finds the original's row (SQLite serializes the two writes instead of failing).
        _insert_sampler(state, values)
    return sampler_id


def _insert_sampler(state: AppState, values: dict[str, Any]) -> None:
    """Add the sampler unless one with its id exists (a transport retry of the creation)."""
    with state.db.write() as session:
        if session.get(SamplingSessionRow, values["id"]) is None:
            session.add(SamplingSessionRow(**values))


@router.post("/create_sampling_session", response_model=CreateSamplingSessionResponse)
async def create_sampling_session(
    body: CreateSamplingSessionRequest, tenant: TenantDep, state: StateDep
) -> CreateSamplingSessionResponse:
    """Register a sampler of a base model or of a checkpoint (sampler or training weights)."""
    sampler_id = await run_in_threadpool(_create_sampler, state, tenant, body)
    return CreateSamplingSessionResponse(sampling_session_id=sampler_id)


def _owned_sampler(state: AppState, tenant: str, sampler_id: str) -> SamplingSessionRow:
    with state.db.read() as session:
        row = session.get(SamplingSessionRow, sampler_id)
        if row is None or row.tenant_id != tenant:
            raise NotFoundError(f"unknown sampling session {sampler_id!r}")
        return row


@router.get(
    "/samplers/{sampler_id}", response_model=GetSamplerResponse, response_model_exclude_none=True
)
async def get_sampler(sampler_id: str, tenant: TenantDep, state: StateDep) -> GetSamplerResponse:
    """The sampler's base model (the SDK loads its tokenizer) and checkpoint path."""
    row = await run_in_threadpool(_owned_sampler, state, tenant, sampler_id)
    return GetSamplerResponse(
        sampler_id=row.id, base_model=row.base_model, model_path=row.model_path
    )


def _storage_path(state: AppState, tenant: str, row: SamplingSessionRow) -> str | None:
    """The directory holding the sampler's weights (None: the base model alone).

    Checked on every ``asample``, so unpublishing, deleting or expiry of a checkpoint also
    stops samplers that other tenants created from it while it was readable.
    """
    if row.model_path is None:
        return None
    with state.db.read() as session:
        if find_checkpoint(session, row.model_path) is not None:
            return readable_checkpoint(session, tenant, row.model_path).storage_path
        source = session.get(ModelRow, row.source_model_id) if row.source_model_id else None
    # An unnamed save_weights_for_sampler snapshot has no checkpoint row, only its directory;
    # any other path without a row was deleted or expired (never read what now sits there).
    parsed = ParsedCheckpointTinkerPath.from_tinker_path(row.model_path)
    unnamed = parsed.checkpoint_type == "sampler" and parsed.name.startswith(EPHEMERAL_PREFIX)
    if source is None or source.tenant_id != tenant or not unnamed:
        raise NotFoundError(f"checkpoint {row.model_path!r} no longer exists")
    root = state.settings.checkpoint_root
    return str(checkpoint_dir(root, parsed.training_run_id, "sampler", parsed.name))


def _unsupported(state: AppState, body: SampleRequest) -> str | None:
    if body.sampling_session_id is None:
        return "sampling_session_id is required (create a sampling client first)"
    limit = state.settings.max_num_samples
    if body.num_samples > limit:
        return (
            f"num_samples {body.num_samples} exceeds this server's limit of {limit} samples "
            "per request (max_num_samples); split it into several requests"
        )
    return None


_SAMPLERS = cast(Table, SamplingSessionRow.__table__)
_SESSIONS = cast(Table, SessionRow.__table__)
_LIVE_SAMPLER = (
    select(_SAMPLERS, _SESSIONS.c.finished_at, _SESSIONS.c.last_heartbeat_at)
    .select_from(_SAMPLERS.outerjoin(_SESSIONS, _SESSIONS.c.id == _SAMPLERS.c.session_id))
    .where(_SAMPLERS.c.id == bindparam("sampler_id"))
)


def _live_sampler(
    state: AppState, tenant: str, sampler_id: str, submission: Submission
) -> SamplingSessionRow:
    """The caller's sampler (else NotFoundError); 410 once its session is finished.

    The session's two columns come with the sampler in one joined Core lookup (every sample's
    path: a third of the cost of the ORM's), as a detached row.
    """
    with state.db.core_read() as conn:
        found = conn.execute(_LIVE_SAMPLER, {"sampler_id": sampler_id}).mappings().first()
    if found is None or found["tenant_id"] != tenant:
        raise NotFoundError(f"unknown sampling session {sampler_id!r}")
    row = SamplingSessionRow(**{c.key: found[c.key] for c in _SAMPLERS.c})
    require_live_session(
        state,
        tenant,
        submission,
        row.session_id,
        found["finished_at"],
        found["last_heartbeat_at"],
    )
    return row


def _prepare_sample(state: AppState, tenant: str, raw: bytes) -> tuple[Submission, int]:
    """The queued submission for an ``asample`` body, failed at once if the body is bad, and
    how many ``sample_sequence_ids`` to answer with (``num_samples`` of a valid body)."""
    try:
        body = SampleRequest.model_validate_json(raw)
    except ValidationError as exc:
        message = f"asample request is invalid: {exc}"
        return Submission(RequestType.SAMPLE, b"", failed=(message, "user")), 1
    problem = _unsupported(state, body)
    key: dict[str, Any] = {"sampling_session_id": body.sampling_session_id, "seq_id": body.seq_id}
    if problem is not None:
        return Submission(RequestType.SAMPLE, b"", failed=(problem, "user"), **key), 1
    try:
        assert body.sampling_session_id is not None
        keyed = Submission(RequestType.SAMPLE, b"", **key)
        sampler = _live_sampler(state, tenant, body.sampling_session_id, keyed)
        storage = _storage_path(state, tenant, sampler)
    except NotFoundError as exc:
        return Submission(RequestType.SAMPLE, b"", failed=(str(exc), "user"), **key), 1
    payload = {
        "request": body.model_dump(mode="json"),
        "base_model": sampler.base_model,
        "storage_path": storage,
    }
    return Submission(RequestType.SAMPLE, json.dumps(payload).encode(), **key), body.num_samples


@router.post("/asample", response_model=UntypedAPIFuture, response_model_exclude_none=True)
async def asample(request: Request, tenant: TenantDep, state: StateDep) -> UntypedAPIFuture:
    """Queue ``num_samples`` generations (also ``compute_logprobs``); answer with the ids."""
    raw = await request.body()
    submission, count = await run_in_threadpool(_prepare_sample, state, tenant, raw)
    request_id = await run_in_threadpool(state.futures.submit, tenant, submission)
    ids = [f"{request_id}:{i}" for i in range(count)]
    return UntypedAPIFuture(request_id=request_id, sample_sequence_ids=ids)
