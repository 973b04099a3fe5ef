"""Run the API server with uvicorn (``python -m tx_server``; ``tx serve`` calls :func:`serve`)."""

from __future__ import annotations

import uvicorn

from tx_server.app import create_app
from tx_server.settings import Settings

__all__ = ["serve"]


def serve(settings: Settings | None = None) -> None:
    """Serve until interrupted, on ``settings.host:settings.port``."""
    settings = settings if settings is not None else Settings()
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
    )
