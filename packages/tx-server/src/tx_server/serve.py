"""Run the API server with uvicorn, and its worker process (``python -m tx_server``).

``tx serve`` calls :func:`serve`. Hub-named base models are fetched into the Hugging Face cache
first (:func:`tx_server.hub.fetch_base_models`; a model that cannot be had stops the start). The
database is migrated before the worker starts, so the two processes never race on the schema. Without served base models there is nothing for a
worker to do and none is started.

The worker is stopped from the app's lifespan shutdown, not after ``uvicorn.run`` returns:
uvicorn re-raises SIGTERM/SIGINT once it has shut down, which would kill this process before
any ``finally`` ran and orphan the worker (the worker also exits when its parent dies).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio.to_thread
import uvicorn
from fastapi import FastAPI

from tx_server.app import create_app
from tx_server.db.database import Database
from tx_server.hub import fetch_base_models
from tx_server.settings import Settings
from tx_server.worker.supervisor import WorkerSupervisor

__all__ = ["serve"]


def _stop_with_app(app: FastAPI, supervisor: WorkerSupervisor) -> None:
    """Chain ``supervisor.stop`` after the app's own lifespan shutdown."""
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator[None]:
        try:
            async with inner(a):
                yield
        finally:
            await anyio.to_thread.run_sync(supervisor.stop)

    app.router.lifespan_context = lifespan


def serve(settings: Settings | None = None) -> None:
    """Serve until interrupted, on ``settings.host:settings.port``."""
    settings = settings if settings is not None else Settings()
    fetch_base_models(settings.base_models)
    app = create_app(settings)
    if settings.base_models:
        db = Database(settings.database_url)
        db.upgrade()
        db.dispose()
        supervisor = WorkerSupervisor(settings)
        _stop_with_app(app, supervisor)
        supervisor.start()
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
    )
