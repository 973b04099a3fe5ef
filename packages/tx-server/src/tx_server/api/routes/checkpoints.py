"""Checkpoint sharing and lifetime: publish, unpublish, TTL, archive download (spec §4.4).

* ``POST|DELETE /training_runs/{run}/checkpoints/{kind}/{name}/publish`` — owner only; a
  public checkpoint is readable by every tenant by its path (weights_info, load, sampling,
  archive), never listed for them. Unpublishing revokes that at once, also for samplers and
  download links handed out meanwhile (each use re-checks :mod:`tx_server.api.access`).
* ``PUT …/ttl`` ``{"ttl_seconds": int | null}`` — expiry counted from now; null removes it.
* ``GET …/archive`` — the legacy "archive URL" call (SDK < 0.38, SkyRL, tx-cli): a 302 whose
  ``Location`` is a signed link (:mod:`tx_server.api.archive`), with an ``Expires`` header and
  ``{"url", "expires"}`` in the body for clients that do not follow redirects.
* ``GET /checkpoint_archives/{token}`` — the link itself: the checkpoint directory as a tar,
  no API key needed (the token is the credential).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from tx_server.api.access import owned_checkpoint, readable_checkpoint, route_tinker_path
from tx_server.api.archive import TarStream, tar_stream
from tx_server.api.deps import StateDep, TenantDep
from tx_server.api.routes.weights import check_ttl
from tx_server.api.state import AppState
from tx_server.db.models import utcnow
from tx_server.errors import NotFoundError
from tx_types import SetCheckpointTtlRequest

__all__ = ["router"]

router = APIRouter(tags=["checkpoints"])

_CHECKPOINT = "/training_runs/{run_id}/checkpoints/{kind}/{name}"


def _set_public(state: AppState, tenant: str, tinker_path: str, public: bool) -> None:
    with state.db.write() as session:
        owned_checkpoint(session, tenant, tinker_path).public = public


@router.post(f"{_CHECKPOINT}/publish", status_code=204, response_class=Response)
async def publish_checkpoint(
    run_id: str, kind: str, name: str, tenant: TenantDep, state: StateDep
) -> Response:
    """Make the caller's checkpoint readable by every tenant (idempotent)."""
    path = route_tinker_path(run_id, kind, name)
    await run_in_threadpool(_set_public, state, tenant, path, True)
    return Response(status_code=204)


@router.delete(f"{_CHECKPOINT}/publish", status_code=204, response_class=Response)
async def unpublish_checkpoint(
    run_id: str, kind: str, name: str, tenant: TenantDep, state: StateDep
) -> Response:
    """Make the caller's checkpoint private again (idempotent)."""
    path = route_tinker_path(run_id, kind, name)
    await run_in_threadpool(_set_public, state, tenant, path, False)
    return Response(status_code=204)


def _set_ttl(state: AppState, tenant: str, tinker_path: str, ttl: int | None) -> None:
    with state.db.write() as session:
        row = owned_checkpoint(session, tenant, tinker_path)
        row.expires_at = utcnow() + timedelta(seconds=ttl) if ttl is not None else None


@router.put(f"{_CHECKPOINT}/ttl", status_code=204, response_class=Response)
async def set_checkpoint_ttl(
    run_id: str,
    kind: str,
    name: str,
    body: SetCheckpointTtlRequest,
    tenant: TenantDep,
    state: StateDep,
) -> Response:
    """Expire the caller's checkpoint ``ttl_seconds`` from now, or never (null)."""
    path = route_tinker_path(run_id, kind, name)
    check_ttl(state, body.ttl_seconds)
    await run_in_threadpool(_set_ttl, state, tenant, path, body.ttl_seconds)
    return Response(status_code=204)


def _check_readable(state: AppState, tenant: str, tinker_path: str) -> None:
    with state.db.read() as session:
        readable_checkpoint(session, tenant, tinker_path)


@router.get(f"{_CHECKPOINT}/archive")
async def checkpoint_archive_url(
    run_id: str, kind: str, name: str, request: Request, tenant: TenantDep, state: StateDep
) -> JSONResponse:
    """302 to a signed, expiring download link of the checkpoint's tar archive."""
    path = route_tinker_path(run_id, kind, name)
    await run_in_threadpool(_check_readable, state, tenant, path)
    token, expires_ts = state.archives.issue(path, tenant)
    url = str(request.url_for("download_checkpoint_archive", token=token))
    expires = datetime.fromtimestamp(expires_ts, UTC)
    headers = {"Location": url, "Expires": format_datetime(expires, usegmt=True)}
    body = {"url": url, "expires": expires.isoformat()}
    return JSONResponse(body, status_code=302, headers=headers)


def _open_archive(state: AppState, token: str) -> tuple[str, TarStream]:
    grant = state.archives.check(token)
    with state.db.read() as session:
        row = readable_checkpoint(session, grant.tenant_id, grant.tinker_path)
        storage = Path(row.storage_path)
    if not storage.is_dir():
        raise NotFoundError(f"the files of {grant.tinker_path!r} are missing")
    return f"{row.model_id}-{row.name}", tar_stream(storage)


@router.get("/checkpoint_archives/{token}", name="download_checkpoint_archive")
async def download_checkpoint_archive(token: str, state: StateDep) -> StreamingResponse:
    """The checkpoint directory as an uncompressed tar, streamed from disk."""
    stem, archive = await run_in_threadpool(_open_archive, state, token)
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in stem)
    headers = {
        "Content-Length": str(archive.length),
        "Content-Disposition": f'attachment; filename="{safe}.tar"',
    }
    return StreamingResponse(archive.chunks, media_type="application/x-tar", headers=headers)
