"""The FastAPI application factory.

``create_app(settings)`` builds the object graph (:class:`~tx_server.api.state.AppState`); the
lifespan then applies the Alembic migrations, subscribes to completion wake-ups and starts the
pruning job and the maintenance job (session expiry, expired-checkpoint cleanup). Importing this module must not import jax or the engine: the API process stays
small and survives a crashing worker (a test checks this in a subprocess).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import timedelta

import anyio.to_thread
from fastapi import FastAPI

from tx_server import __version__
from tx_server.api.errors import install_error_handlers
from tx_server.api.maintenance import maintain_forever
from tx_server.api.routes import ROUTERS
from tx_server.api.state import AppState
from tx_server.settings import Settings
from tx_server.wake import FUTURES
from tx_server.work_queue import prune_finished

__all__ = ["create_app"]

log = logging.getLogger(__name__)
API_PREFIX = "/api/v1"


async def _prune_forever(state: AppState) -> None:
    """Delete finished futures older than the retention, every ``prune_interval_seconds``."""
    retention = timedelta(seconds=state.settings.future_retention_seconds)
    while True:
        try:
            count = await anyio.to_thread.run_sync(prune_finished, state.db, retention)
            if count:
                log.info("pruned %d finished futures", count)
        except Exception:
            log.exception("pruning futures failed; retrying at the next interval")
        await asyncio.sleep(state.settings.prune_interval_seconds)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The tx API server for ``settings`` (default: read from ``TX_*`` variables)."""
    state = AppState.build(settings if settings is not None else Settings())

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(state.db.upgrade)
        subscription = await state.bus.subscribe_async(FUTURES, state.waiters.wake)
        tasks = [
            asyncio.create_task(_prune_forever(state), name="prune-futures"),
            asyncio.create_task(maintain_forever(state), name="maintenance"),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await subscription.close()
            state.bus.close()
            state.db.dispose()

    app = FastAPI(title="tx", version=__version__, lifespan=lifespan)
    app.state.tx = state
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router, prefix=API_PREFIX)
    return app
