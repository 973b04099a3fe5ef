"""The per-app object graph that route dependencies read (``app.state.tx``)."""

from __future__ import annotations

from dataclasses import dataclass

from tx_server.auth import Keyring
from tx_server.db.database import Database
from tx_server.futures import CompletionWaiters, FutureStore
from tx_server.sessions import SessionService
from tx_server.settings import Settings
from tx_server.wake import WakeBus, wake_bus_for

__all__ = ["AppState"]


@dataclass
class AppState:
    """Everything a request handler may need, built once by ``create_app``."""

    settings: Settings
    db: Database
    bus: WakeBus
    keyring: Keyring
    sessions: SessionService
    futures: FutureStore
    waiters: CompletionWaiters

    @classmethod
    def build(cls, settings: Settings) -> AppState:
        db = Database(settings.database_url)
        bus = wake_bus_for(db)
        return cls(
            settings=settings,
            db=db,
            bus=bus,
            keyring=Keyring.from_settings(settings),
            sessions=SessionService(db),
            futures=FutureStore(db, bus),
            waiters=CompletionWaiters(),
        )
