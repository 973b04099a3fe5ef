"""SDK telemetry: always ``{"status": "accepted"}`` (anything else makes the SDK drop it)."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends
from pydantic import ValidationError

from tx_server.api.deps import authenticate
from tx_types import TelemetryResponse, TelemetrySendRequest

router = APIRouter(tags=["telemetry"], dependencies=[Depends(authenticate)])
log = logging.getLogger(__name__)


@router.post("/telemetry", response_model=TelemetryResponse)
def telemetry(body: Annotated[dict[str, Any], Body()]) -> TelemetryResponse:
    """Accept any batch; newer SDK event shapes must not turn into client-side warnings."""
    try:
        batch = TelemetrySendRequest.model_validate(body)
        log.debug("telemetry: %d events from session %s", len(batch.events), batch.session_id)
    except ValidationError:
        log.debug("telemetry: unrecognised batch accepted")
    return TelemetryResponse(status="accepted")
