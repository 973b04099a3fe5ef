"""The PostgreSQL path against a real server: migrations and LISTEN/NOTIFY wake-ups.

A throw-away cluster is created with the ``postgresql`` binaries by the ``pg_url`` fixture
(``conftest.py``: initdb into a temp dir, unix socket only, trust auth, run as the ``postgres``
user when the tests run as root). Skipped with a message when the binaries are absent
(``apt-get install -y postgresql``).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import httpx
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from tx_server.auth import tenant_of_key
from tx_server.db.database import Database
from tx_server.db.models import Base
from tx_server.futures import FutureStore, RequestType, Submission
from tx_server.testing import API_KEY, make_settings, run_server, wake_latencies
from tx_server.wake import WORK, PostgresWakeBus, wake_bus_for
from tx_server.work_queue import WorkQueue


def test_migrations_on_postgresql(pg_url: str) -> None:
    db = Database(pg_url)
    db.upgrade()
    db.upgrade()
    assert {"sessions", "models", "futures", "checkpoints", "sampling_sessions"} <= set(
        inspect(db.engine).get_table_names()
    )
    with db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    assert isinstance(wake_bus_for(db), PostgresWakeBus)
    db.dispose()


def test_the_workers_listen_connection_survives_its_backend_being_terminated(
    pg_url: str,
) -> None:
    """A PostgreSQL restart or ``pg_terminate_backend`` breaks the worker's LISTEN connection;
    its wait used to raise (killing the worker process). It reconnects and hears the next
    notification."""
    db = Database(pg_url)
    bus = PostgresWakeBus(db)
    with bus.subscribe(WORK) as work:
        with db.engine.begin() as conn:
            killed = conn.scalar(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"
                )
            )
        assert killed == 1
        assert work.wait(timeout=0.2) == []  # the broken wait: reconnects, no exception
        with db.core_write() as tx:
            bus.publish(tx, WORK, "after")
        assert work.wait(timeout=5.0) == ["after"]
    db.dispose()


def test_listen_notify_wakes_polls_and_the_worker(pg_url: str, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, database_url=pg_url, future_recheck_seconds=10.0)
    with run_server(settings) as server:
        db = Database(pg_url)
        store, queue = FutureStore(db, wake_bus_for(db)), WorkQueue(Database(pg_url))
        with queue.subscribe_work() as work:
            started = time.perf_counter()
            assert work.wait(timeout=0.0) == []  # a sampling batch's check: never blocks
            assert time.perf_counter() - started < 0.5

            def submit(model_id: str) -> str:
                return store.submit(
                    tenant_of_key(API_KEY),
                    Submission(
                        RequestType.FORWARD_BACKWARD,
                        b"\x08\x01",
                        "application/x-protobuf",
                        model_id=model_id,
                        seq_id=1,
                    ),
                )

            request_id = submit("m")
            assert work.wait(timeout=5.0) == ["m"]  # the idle worker's blocking wait
            other_id = submit("n")
            deadline = time.monotonic() + 10
            while not (got := work.wait(timeout=0.0)):  # non-blocking reads see it too
                assert time.monotonic() < deadline, "the notification never arrived"
                time.sleep(0.001)
            assert got == ["n"]
        claimed = [c.request_id for c in queue.claim_pending()]
        assert claimed == [request_id, other_id]
        queue.complete(request_id, b"\x01\x02", "application/x-protobuf")
        response = httpx.post(
            f"{server.url}/api/v1/retrieve_future",
            json={"request_id": request_id},
            headers={"X-API-Key": API_KEY},
            timeout=30,
        )
        assert response.content == b"\x01\x02"
        assert response.headers["content-type"] == "application/x-protobuf"

        def submit(i: int) -> str:
            return store.submit(tenant_of_key(API_KEY), Submission(RequestType.SAMPLE, b"{}"))

        latencies = wake_latencies(server, submit, samples=3)
        median = statistics.median(latencies)
        print(
            f"PostgreSQL LISTEN/NOTIFY wake-up latency: median {median * 1e3:.1f} ms, "
            f"max {max(latencies) * 1e3:.1f} ms"
        )
        assert median < 0.25, latencies  # the re-check is 10 s
        assert max(latencies) < 2.0, latencies
        db.dispose()
