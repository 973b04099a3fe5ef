"""Request dependencies: app state, the caller's tenant, and owned-resource lookups.

Ownership checks live here as ``Annotated`` dependencies so handlers stay one-liners and no
route can forget them: a resource of another tenant is reported exactly like a missing one.
"""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import Depends, Header, Request
from starlette.concurrency import run_in_threadpool

from tx_server.api.state import AppState
from tx_server.db.models import SessionRow

__all__ = ["OwnedSessionDep", "StateDep", "TenantDep", "authenticate", "get_state"]


async def get_state(request: Request) -> AppState:
    """The app's object graph (see :class:`AppState`).

    ``async`` (like :func:`authenticate`) because FastAPI runs a plain ``def`` dependency in
    the thread pool: two thread hops per request for a dictionary lookup.
    """
    return cast(AppState, request.app.state.tx)


StateDep = Annotated[AppState, Depends(get_state)]


async def authenticate(
    state: StateDep,
    x_api_key: Annotated[str | None, Header(alias="X-API-Key")] = None,
) -> str:
    """The caller's tenant id from ``X-API-Key`` (401 when missing or unknown)."""
    return state.keyring.tenant_for(x_api_key)


TenantDep = Annotated[str, Depends(authenticate)]


async def owned_session(session_id: str, tenant: TenantDep, state: StateDep) -> SessionRow:
    """The session named in the path, if it belongs to the caller (else 404)."""
    return await run_in_threadpool(state.sessions.get_owned, tenant, session_id)


OwnedSessionDep = Annotated[SessionRow, Depends(owned_session)]
