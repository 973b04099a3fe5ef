"""Route modules, one per resource; ``ROUTERS`` is mounted under ``/api/v1`` by the app."""

from __future__ import annotations

from tx_server.api.routes import (
    checkpoints,
    client,
    futures,
    health,
    models,
    runs,
    sampling,
    sessions,
    telemetry,
    training,
    weights,
)

ROUTERS = (
    health.router,
    client.router,
    sessions.router,
    telemetry.router,
    futures.router,
    models.router,
    training.router,
    weights.router,
    runs.router,
    checkpoints.router,
    sampling.router,
)

__all__ = ["ROUTERS"]
