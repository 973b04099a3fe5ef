"""Route modules, one per resource; ``ROUTERS`` is mounted under ``/api/v1`` by the app."""

from __future__ import annotations

from tx_server.api.routes import client, futures, health, sessions, telemetry

ROUTERS = (health.router, client.router, sessions.router, telemetry.router, futures.router)

__all__ = ["ROUTERS"]
