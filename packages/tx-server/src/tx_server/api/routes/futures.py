"""``retrieve_future``: long-poll a request's outcome (spec §3.2–3.5).

The answer is the stored result bytes with their content type (protobuf for forward/backward
and sampling, JSON otherwise), a 200 ``{"error", "category"}`` body for a failed request, 408
after ``long_poll_seconds`` without an outcome (the SDK re-polls at once), 404 for an unknown
or foreign request id.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from tx_server.api.deps import StateDep, TenantDep
from tx_server.db.models import FutureStatus
from tx_server.futures import JSON, FutureOutcome, await_outcome
from tx_types import FutureRetrieveRequest, RequestErrorCategory, RequestFailedResponse

router = APIRouter(tags=["futures"])

_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {
        "description": "The result (JSON or application/x-protobuf) or a failure body",
        "model": RequestFailedResponse,
    },
    404: {"description": "Unknown request_id"},
    408: {"description": "Still pending after the long-poll; poll again"},
}


@router.post("/retrieve_future", response_model=None, responses=_RESPONSES)
async def retrieve_future(
    body: FutureRetrieveRequest, tenant: TenantDep, state: StateDep
) -> Response:
    """Wait (≤ ``long_poll_seconds``) for the request to finish, then return its outcome."""
    outcome = await await_outcome(
        state.futures,
        state.waiters,
        tenant,
        body.request_id,
        timeout=state.settings.long_poll_seconds,
        recheck=state.settings.future_recheck_seconds,
    )
    return _outcome_response(outcome)


def _outcome_response(outcome: FutureOutcome) -> Response:
    if outcome.status is FutureStatus.FAILED:
        failed = RequestFailedResponse(
            error=outcome.error_message or "request failed",
            category=RequestErrorCategory(outcome.error_category or "unknown"),
        )
        return JSONResponse(failed.model_dump(mode="json"))
    return Response(content=outcome.result or b"", media_type=outcome.result_content_type or JSON)
