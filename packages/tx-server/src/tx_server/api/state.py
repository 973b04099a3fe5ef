"""The per-app object graph that route dependencies read (``app.state.tx``)."""

from __future__ import annotations

from dataclasses import dataclass

from tx_server.api.archive import ArchiveSigner
from tx_server.auth import Keyring
from tx_server.db.database import Database
from tx_server.futures import BackpressureLimits, CompletionWaiters, FutureStore
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
    archives: ArchiveSigner

    @classmethod
    def build(cls, settings: Settings) -> AppState:
        db = Database(settings.database_url)
        bus = wake_bus_for(db)
        limits = BackpressureLimits(
            per_tenant=settings.max_pending_futures_per_tenant,
            total=settings.max_pending_futures,
            retry_after=settings.backpressure_retry_after_seconds,
        )
        key = settings.archive_signing_key
        return cls(
            settings=settings,
            db=db,
            bus=bus,
            keyring=Keyring.from_settings(settings),
            sessions=SessionService(db, timeout_seconds=settings.session_timeout_seconds),
            futures=FutureStore(db, bus, limits),
            waiters=CompletionWaiters(),
            archives=ArchiveSigner(
                key.get_secret_value().encode() if key is not None else None,
                settings.archive_url_ttl_seconds,
            ),
        )
