"""Session life cycle: create, heartbeat (410 after finish), finish (spec §2, §4.1, §4.6)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Response

from tx_server.api.deps import OwnedSessionDep, StateDep, TenantDep
from tx_types import (
    CreateSessionRequest,
    CreateSessionResponse,
    FinishSessionRequest,
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
