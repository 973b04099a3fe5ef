"""Cross-process wake-ups: "request X finished" to the API, "work is pending" to the worker.

Why: the worker is a separate process, and ``retrieve_future`` must answer within
milliseconds of completion without sleep-polling the database. A wake-up is only a *hint* to
re-read the database, never data: a lost one costs at most the pollers' safety re-check
interval, and a spurious one costs one cheap query.

Two transports behind one interface (:class:`WakeBus`), chosen by the database URL:

* PostgreSQL: ``LISTEN``/``NOTIFY``. ``publish`` runs ``pg_notify`` inside the writer's own
  transaction, so PostgreSQL delivers it exactly when the result becomes visible, and drops
  it on rollback.
* SQLite: UDP datagrams on 127.0.0.1. Each subscriber binds an ephemeral port and registers
  it as an empty file ``{channel}.{pid}.{port}`` in a directory next to the database file
  (``tx.db-wake/``); a publisher sends one datagram per registered port *after* its commit.
  Files of dead processes are removed by the next publisher that scans. Publishers cache the
  port list while the directory's mtime is unchanged (at most :data:`RESCAN_SECONDS`), so a
  send is one ``stat`` plus one ``sendto`` per subscriber. No configuration, any number of API
  processes, no unix-socket path length limits.

``publish`` takes an ORM :class:`~sqlalchemy.orm.Session` or a Core
:class:`~tx_server.db.database.WriteTx` (the queue's hot path).

Channel names are fixed: :data:`FUTURES` carries request ids, :data:`WORK` carries model ids.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import select
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.orm import Session

from tx_server.db.database import Database, WriteTx, sqlite_path

__all__ = ["FUTURES", "WORK", "AsyncSubscription", "SyncSubscription", "WakeBus", "wake_bus_for"]

log = logging.getLogger(__name__)

FUTURES = "tx_futures"
WORK = "tx_work"
_CHANNELS = (FUTURES, WORK)
_PENDING_KEY = "tx_wake_pending"
RESCAN_SECONDS = 1.0
"""How long a publisher trusts its cached subscriber ports while the directory is unchanged."""


class AsyncSubscription(abc.ABC):
    """An open subscription in an asyncio loop; messages go to the callback given at start."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop receiving and release the socket/connection."""


class SyncSubscription(abc.ABC):
    """A blocking subscription for a worker loop."""

    @abc.abstractmethod
    def wait(self, timeout: float) -> list[str]:
        """Block until at least one message arrives or ``timeout`` s pass; return all received."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop receiving and release the socket/connection."""

    def __enter__(self) -> SyncSubscription:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class WakeBus(abc.ABC):
    """Publish/subscribe of wake-up hints between the processes sharing one database."""

    @abc.abstractmethod
    def publish(self, session: Session | WriteTx, channel: str, message: str) -> None:
        """Send ``message`` on ``channel`` once ``session``'s transaction commits."""

    @abc.abstractmethod
    async def subscribe_async(
        self, channel: str, callback: Callable[[str], None]
    ) -> AsyncSubscription:
        """Start delivering ``channel`` messages to ``callback`` in the running loop."""

    @abc.abstractmethod
    def subscribe(self, channel: str) -> SyncSubscription:
        """Open a blocking subscription to ``channel``."""

    def close(self) -> None:  # noqa: B027 - most transports hold nothing to release
        """Release the publisher's resources (subscriptions are closed separately)."""


def _check_channel(channel: str) -> None:
    if channel not in _CHANNELS:
        raise ValueError(f"channel must be one of {_CHANNELS}, got {channel!r}")


def wake_bus_for(db: Database) -> WakeBus:
    """The transport that fits ``db``: LISTEN/NOTIFY on PostgreSQL, UDP otherwise."""
    if db.is_postgresql:
        return PostgresWakeBus(db)
    path = sqlite_path(db.url)
    directory = (
        path.with_name(path.name + "-wake") if path else Path(tempfile.mkdtemp(prefix="tx-wake-"))
    )
    return UdpWakeBus(db, directory)


# --------------------------------------------------------------------------------------------
# SQLite: UDP datagrams on 127.0.0.1, subscribers registered as files


class _UdpRegistry:
    """The ``{channel}.{pid}.{port}`` files in one directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._cache: dict[str, tuple[int, float, list[int]]] = {}

    def register(self, channel: str, port: int) -> Path:
        path = self.directory / f"{channel}.{os.getpid()}.{port}"
        path.touch()
        return path

    def ports(self, channel: str) -> list[int]:
        """The live subscribers' ports (cached; see the module docstring)."""
        mtime, now = self.directory.stat().st_mtime_ns, time.monotonic()
        cached = self._cache.get(channel)
        if cached is not None and cached[0] == mtime and now - cached[1] < RESCAN_SECONDS:
            return cached[2]
        ports = self._scan(channel)
        self._cache[channel] = (mtime, now, ports)
        return ports

    def _scan(self, channel: str) -> list[int]:
        ports = []
        for path in self.directory.glob(f"{channel}.*.*"):
            _, pid, port = path.name.rsplit(".", 2)
            if not _alive(int(pid)):
                path.unlink(missing_ok=True)
                continue
            ports.append(int(port))
        return ports


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, callback: Callable[[str], None]) -> None:
        self.callback = callback

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.callback(data.decode("utf-8", errors="replace"))


class _UdpAsyncSubscription(AsyncSubscription):
    def __init__(self, transport: asyncio.DatagramTransport, registration: Path) -> None:
        self.transport = transport
        self.registration = registration

    async def close(self) -> None:
        self.registration.unlink(missing_ok=True)
        self.transport.close()


class _UdpSyncSubscription(SyncSubscription):
    def __init__(self, sock: socket.socket, registration: Path) -> None:
        self.sock = sock
        self.registration = registration

    def wait(self, timeout: float) -> list[str]:
        ready, _, _ = select.select([self.sock], [], [], max(timeout, 0.0))
        messages: list[str] = []
        while ready:
            data = self.sock.recv(65536)
            messages.append(data.decode("utf-8", errors="replace"))
            ready, _, _ = select.select([self.sock], [], [], 0.0)
        return messages

    def close(self) -> None:
        self.registration.unlink(missing_ok=True)
        self.sock.close()


class UdpWakeBus(WakeBus):
    """Wake-ups for SQLite: datagrams to the ports registered in ``directory``."""

    def __init__(self, db: Database, directory: Path) -> None:
        self.registry = _UdpRegistry(directory)
        self._sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def publish(self, session: Session | WriteTx, channel: str, message: str) -> None:
        _check_channel(channel)
        if isinstance(session, WriteTx):
            session.after_commit.append(lambda: self.send_now(channel, message))
            return
        pending = session.info.get(_PENDING_KEY)
        if pending is None:
            pending = session.info[_PENDING_KEY] = []
            event.listen(session, "after_commit", self._after_commit, once=True)
            event.listen(session, "after_rollback", self._after_rollback, once=True)
        pending.append((channel, message))

    def _after_commit(self, session: Session) -> None:
        for channel, message in session.info.pop(_PENDING_KEY, []):
            self.send_now(channel, message)

    def _after_rollback(self, session: Session) -> None:
        session.info.pop(_PENDING_KEY, None)

    def close(self) -> None:
        self._sender.close()

    def send_now(self, channel: str, message: str) -> None:
        """Send immediately (outside any transaction)."""
        data = message.encode("utf-8")
        for port in self.registry.ports(channel):
            with contextlib.suppress(OSError):  # a closed port: the file goes with its process
                self._sender.sendto(data, ("127.0.0.1", port))

    async def subscribe_async(
        self, channel: str, callback: Callable[[str], None]
    ) -> AsyncSubscription:
        _check_channel(channel)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(callback), local_addr=("127.0.0.1", 0)
        )
        port = transport.get_extra_info("sockname")[1]
        return _UdpAsyncSubscription(transport, self.registry.register(channel, port))

    def subscribe(self, channel: str) -> SyncSubscription:
        _check_channel(channel)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        return _UdpSyncSubscription(sock, self.registry.register(channel, sock.getsockname()[1]))


# --------------------------------------------------------------------------------------------
# PostgreSQL: LISTEN/NOTIFY


def _conninfo(db: Database) -> str:
    """A libpq URI for psycopg from the SQLAlchemy URL (driver suffix dropped)."""
    return db.url.set(drivername="postgresql").render_as_string(hide_password=False)


class _PgAsyncSubscription(AsyncSubscription):
    """A LISTEN connection read by one task; it reconnects after errors."""

    def __init__(self, conninfo: str, channel: str, callback: Callable[[str], None]) -> None:
        self.conninfo = conninfo
        self.channel = channel
        self.callback = callback
        self.ready = asyncio.Event()
        self.task = asyncio.create_task(self._run(), name=f"listen-{channel}")

    async def _run(self) -> None:
        import psycopg

        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.conninfo, autocommit=True
                ) as conn:
                    await conn.execute(f"LISTEN {self.channel}")
                    self.ready.set()
                    async for notify in conn.notifies():
                        self.callback(notify.payload)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Pollers fall back to their safety re-check meanwhile.
                log.exception("LISTEN %s connection lost; reconnecting in 1 s", self.channel)
                self.ready.set()
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


class _PgSyncSubscription(SyncSubscription):
    """A LISTEN connection read by one thread (the worker's); it reconnects after errors.

    Why: a PostgreSQL restart (or an administrator's ``pg_terminate_backend``) breaks the
    connection, and an exception out of :meth:`wait` killed the worker process, failing
    whatever it ran. Now a broken wait reconnects and answers "nothing" — the worker's loop
    re-reads the queue anyway, so the notifications lost while disconnected cost nothing —
    and while the server is down each wait retries after at most ``RECONNECT_SECONDS``.
    """

    RECONNECT_SECONDS = 1.0

    def __init__(self, conninfo: str, channel: str) -> None:
        self.conninfo = conninfo
        self.channel = channel
        self.conn: Any = None
        self._connect()

    def _connect(self) -> None:
        import psycopg

        self.conn = psycopg.connect(self.conninfo, autocommit=True)
        self.conn.execute(f"LISTEN {self.channel}")

    def wait(self, timeout: float) -> list[str]:
        import psycopg

        try:
            if self.conn is None:
                self._connect()
            messages = [n.payload for n in self.conn.notifies(timeout=timeout, stop_after=1)]
            if messages:  # drain whatever else already arrived
                messages += [n.payload for n in self.conn.notifies(timeout=0.001)]
            return messages
        except psycopg.OperationalError:
            log.warning("LISTEN %s connection lost; reconnecting", self.channel, exc_info=True)
            self.close()
            time.sleep(min(timeout, self.RECONNECT_SECONDS))
            with contextlib.suppress(psycopg.OperationalError):
                self._connect()
            return []

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None


class PostgresWakeBus(WakeBus):
    """Wake-ups for PostgreSQL via LISTEN/NOTIFY, delivered at the writer's commit."""

    def __init__(self, db: Database) -> None:
        self.conninfo = _conninfo(db)

    def publish(self, session: Session | WriteTx, channel: str, message: str) -> None:
        _check_channel(channel)
        target = session.conn if isinstance(session, WriteTx) else session
        target.execute(
            text("SELECT pg_notify(:channel, :message)"), {"channel": channel, "message": message}
        )

    async def subscribe_async(
        self, channel: str, callback: Callable[[str], None]
    ) -> AsyncSubscription:
        _check_channel(channel)
        subscription = _PgAsyncSubscription(self.conninfo, channel, callback)
        await asyncio.wait_for(subscription.ready.wait(), timeout=30)
        return subscription

    def subscribe(self, channel: str) -> SyncSubscription:
        _check_channel(channel)
        return _PgSyncSubscription(self.conninfo, channel)
