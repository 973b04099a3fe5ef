"""Liveness probe (no API key needed, so load balancers can call it)."""

from __future__ import annotations

from fastapi import APIRouter

from tx_types import HealthResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthResponse)
def healthz() -> HealthResponse:
    """The process is up and serving requests."""
    return HealthResponse(status="ok")
