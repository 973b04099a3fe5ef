"""Sessions: create, heartbeat (410 after finish), finish (spec §2, §4.1, §4.6), and the
RestClient's listing (``list_sessions``: the caller's session ids, newest first) and
``get_session`` (its training runs and samplers in creation order, its metadata and name;
404 for another tenant's session), spec §4.4. Both access scopes see the caller's own sessions,
as for training runs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Response
from starlette.concurrency import run_in_threadpool

from tx_server.api.deps import OwnedSessionDep, StateDep, TenantDep
from tx_server.api.routes.runs import AccessScope, PageLimit, PageOffset
from tx_types import (
    CreateSessionRequest,
    CreateSessionResponse,
    FinishSessionRequest,
    GetSessionResponse,
    ListSessionsResponse,
    SessionHeartbeatRequest,
    SessionHeartbeatResponse,
)

router = APIRouter(tags=["sessions"])


@router.post("/create_session", response_model=CreateSessionResponse)
def create_session(
    body: CreateSessionRequest,
    tenant: TenantDep,
    state: StateDep,
    idempotency_key: Annotated[str | None, Header(alias="X-Idempotency-Key")] = None,
) -> CreateSessionResponse:
    """A new session; a transport-level retry of the same call returns the same id."""
    session_id = state.sessions.create(
        tenant,
        tags=body.tags,
        user_metadata=body.user_metadata,
        sdk_version=body.sdk_version,
        project_id=body.project_id,
        display_name=body.display_name,
        idempotency_key=idempotency_key,
    )
    return CreateSessionResponse(session_id=session_id)


@router.post("/session_heartbeat", response_model=SessionHeartbeatResponse)
def session_heartbeat(
    body: SessionHeartbeatRequest, tenant: TenantDep, state: StateDep
) -> SessionHeartbeatResponse:
    """Keep the session alive; 410 once it is finished (stops the SDK's heartbeat loop)."""
    state.sessions.heartbeat(tenant, body.session_id)
    return SessionHeartbeatResponse()


@router.post("/sessions/{session_id}/finish", status_code=204, response_class=Response)
def finish_session(
    body: FinishSessionRequest, session: OwnedSessionDep, tenant: TenantDep, state: StateDep
) -> Response:
    """Finish the session (first reason wins); the SDK accepts any 2xx here."""
    state.sessions.finish(tenant, session.id, body.reason.type, body.detail)
    return Response(status_code=204)


@router.get("/sessions", response_model=ListSessionsResponse)
async def list_sessions(
    tenant: TenantDep,
    state: StateDep,
    limit: PageLimit = 20,
    offset: PageOffset = 0,
    access_scope: AccessScope = "owned",  # validated only: both scopes see the same sessions
) -> ListSessionsResponse:
    """The caller's session ids, newest first."""
    ids = await run_in_threadpool(state.sessions.list_ids, tenant, limit, offset)
    return ListSessionsResponse(sessions=ids)


@router.get("/sessions/{session_id}", response_model=GetSessionResponse)
async def get_session(
    session: OwnedSessionDep,
    state: StateDep,
    access_scope: AccessScope = "owned",  # validated only
) -> GetSessionResponse:
    """The session's training run ids and sampler ids, its user metadata and display name."""
    runs, samplers = await run_in_threadpool(state.sessions.members, session.id)
    return GetSessionResponse(
        training_run_ids=runs,
        sampler_ids=samplers,
        user_metadata={str(k): str(v) for k, v in session.user_metadata.items()} or None,
        display_name=session.display_name,
    )
