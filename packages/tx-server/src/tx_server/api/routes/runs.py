"""Training runs and their checkpoints (RestClient, spec §4.4, §6.10).

Only the caller's runs are listed (``access_scope=accessible`` sees the same set: published
checkpoints are shared by path, see :mod:`tx_server.api.routes.checkpoints`); any other scope is
a 422. ``GET /checkpoints`` (``list_user_checkpoints``) pages through the caller's checkpoints
of all its runs, newest first. ``offset`` is bounded so that it always fits the database's
64-bit integers: a larger one failed inside the query (a 500, retried by the SDK for minutes).
Checkpoints whose TTL ran out are never listed, even before the cleanup removes them.
Deleting a checkpoint removes its row first, then its files, so a half-deleted checkpoint is
never listed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Query, Response
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from tx_server.api.access import live_checkpoint, route_tinker_path
from tx_server.api.deps import StateDep, TenantDep
from tx_server.api.routes.models import get_owned_model
from tx_server.api.state import AppState
from tx_server.db.models import CheckpointRow, ModelRow, utcnow
from tx_server.errors import NotFoundError
from tx_server.worker.storage import SEGMENTS, remove_dir
from tx_types import (
    Checkpoint,
    CheckpointsListResponse,
    Cursor,
    TrainingRun,
    TrainingRunsResponse,
)

router = APIRouter(tags=["training_runs"])

RowT = TypeVar("RowT", ModelRow, CheckpointRow)
MAX_OFFSET = 2**62
"""Far past any real list, and ``offset + limit`` still fits a signed 64-bit integer."""
PageLimit = Annotated[int, Query(ge=1, le=1000)]
"""A listing's ``limit`` query parameter (each route picks its default)."""
PageOffset = Annotated[int, Query(ge=0, le=MAX_OFFSET)]
"""A listing's ``offset`` query parameter (see :data:`MAX_OFFSET`)."""

AccessScope = Literal["owned", "accessible"]
"""The ``access_scope`` values of the SDK's RestClient (spec §4.4)."""


def _checkpoint(row: CheckpointRow) -> Checkpoint:
    return Checkpoint(
        checkpoint_id=f"{SEGMENTS[row.checkpoint_type]}/{row.name}",
        checkpoint_type=row.checkpoint_type,  # type: ignore[arg-type]
        time=row.created_at,
        tinker_path=row.tinker_path,
        size_bytes=row.size_bytes,
        public=row.public,
        user_metadata=dict(row.user_metadata) or None,
        expires_at=row.expires_at,
    )


def _run(state: AppState, row: ModelRow) -> TrainingRun:
    with state.db.read() as session:
        rows = session.scalars(
            select(CheckpointRow)
            .where(CheckpointRow.model_id == row.id, live_checkpoint())
            .order_by(CheckpointRow.created_at.desc())
        ).all()
    latest = {kind: next((c for c in rows if c.checkpoint_type == kind), None) for kind in SEGMENTS}
    training, sampler = latest["training"], latest["sampler"]
    return TrainingRun(
        training_run_id=row.id,
        base_model=row.base_model,
        model_owner=row.tenant_id,
        is_lora=True,
        corrupted=row.corrupted,
        lora_rank=int(row.lora_config.get("rank", 32)),
        last_request_time=row.last_request_at,
        last_checkpoint=_checkpoint(training) if training else None,
        last_sampler_checkpoint=_checkpoint(sampler) if sampler else None,
        user_metadata=dict(row.user_metadata) or None,
    )


def _list_runs(state: AppState, tenant: str, limit: int, offset: int) -> TrainingRunsResponse:
    order = (ModelRow.created_at.desc(), ModelRow.id)
    with state.db.read() as session:
        rows, total = _page(
            session, ModelRow, (ModelRow.tenant_id == tenant,), order, limit, offset
        )
    return TrainingRunsResponse(
        training_runs=[_run(state, r) for r in rows],
        cursor=Cursor(offset=offset, limit=limit, total_count=total),
    )


def _page(
    session: Session,
    entity: type[RowT],
    where: tuple[ColumnElement[bool], ...],
    order: tuple[Any, ...],
    limit: int,
    offset: int,
) -> tuple[Sequence[RowT], int]:
    """One page of the ``entity`` rows matching ``where`` in ``order``, and how many match."""
    total = session.scalar(select(func.count()).select_from(entity).where(*where))
    rows = session.scalars(
        select(entity).where(*where).order_by(*order).limit(limit).offset(offset)
    ).all()
    return rows, int(total or 0)


@router.get("/training_runs", response_model=TrainingRunsResponse)
async def list_training_runs(
    tenant: TenantDep,
    state: StateDep,
    limit: PageLimit = 20,
    offset: PageOffset = 0,
    access_scope: AccessScope = "owned",  # validated only: both scopes see the same runs
) -> TrainingRunsResponse:
    """The caller's training runs, newest first."""
    return await run_in_threadpool(_list_runs, state, tenant, limit, offset)


@router.get("/training_runs/{run_id}", response_model=TrainingRun)
async def get_training_run(
    run_id: str,
    tenant: TenantDep,
    state: StateDep,
    access_scope: AccessScope = "owned",  # validated only: both scopes see the same runs
) -> TrainingRun:
    """One training run of the caller (404 for unknown and foreign ids)."""
    row = await run_in_threadpool(get_owned_model, state, tenant, run_id)
    return await run_in_threadpool(_run, state, row)


def _listing(
    rows: Sequence[CheckpointRow],
    offset: int = 0,
    limit: int | None = None,
    total: int | None = None,
) -> CheckpointsListResponse:
    """``rows`` as a listing; without ``limit``/``total`` the rows are the whole list."""
    items = [_checkpoint(r) for r in rows]
    return CheckpointsListResponse(
        checkpoints=items,
        cursor=Cursor(
            offset=offset,
            limit=len(items) if limit is None else limit,
            total_count=len(items) if total is None else total,
        ),
    )


def _list_checkpoints(state: AppState, tenant: str, run_id: str) -> CheckpointsListResponse:
    get_owned_model(state, tenant, run_id)
    with state.db.read() as session:
        rows = session.scalars(
            select(CheckpointRow)
            .where(CheckpointRow.model_id == run_id, live_checkpoint())
            .order_by(CheckpointRow.created_at)
        ).all()
    return _listing(rows)


@router.get("/training_runs/{run_id}/checkpoints", response_model=CheckpointsListResponse)
async def list_checkpoints(
    run_id: str, tenant: TenantDep, state: StateDep
) -> CheckpointsListResponse:
    """Every checkpoint of the run, oldest first."""
    return await run_in_threadpool(_list_checkpoints, state, tenant, run_id)


def _list_user_checkpoints(
    state: AppState, tenant: str, limit: int, offset: int
) -> CheckpointsListResponse:
    # One "now" for the count and the page, so they agree on which checkpoints are live.
    mine = (CheckpointRow.tenant_id == tenant, live_checkpoint(utcnow()))
    order = (CheckpointRow.created_at.desc(), CheckpointRow.id.desc())
    with state.db.read() as session:
        rows, total = _page(session, CheckpointRow, mine, order, limit, offset)
    return _listing(rows, offset, limit, total)


@router.get("/checkpoints", response_model=CheckpointsListResponse)
async def list_user_checkpoints(
    tenant: TenantDep,
    state: StateDep,
    limit: PageLimit = 100,
    offset: PageOffset = 0,
) -> CheckpointsListResponse:
    """The caller's checkpoints across all of its training runs, newest first."""
    return await run_in_threadpool(_list_user_checkpoints, state, tenant, limit, offset)


def _delete(state: AppState, tenant: str, run_id: str, kind: str, name: str) -> None:
    get_owned_model(state, tenant, run_id)
    tinker_path = route_tinker_path(run_id, kind, name)
    with state.db.write() as session:
        row = session.scalar(select(CheckpointRow).where(CheckpointRow.tinker_path == tinker_path))
        if row is None or row.tenant_id != tenant:
            raise NotFoundError(f"unknown checkpoint {tinker_path!r}")
        storage = row.storage_path
        session.delete(row)
    remove_dir(Path(storage))


@router.delete(
    "/training_runs/{run_id}/checkpoints/{kind}/{name}", status_code=204, response_class=Response
)
async def delete_checkpoint(
    run_id: str, kind: str, name: str, tenant: TenantDep, state: StateDep
) -> Response:
    """Delete one checkpoint (row, then files)."""
    await run_in_threadpool(_delete, state, tenant, run_id, kind, name)
    return Response(status_code=204)
