"""The worker's main loop, run as a process (``python -m tx_server.worker``) or a thread.

Start-up puts requests a crashed worker left ``running`` back to ``pending``. Then: claim
everything runnable, execute it, and block on the work subscription until a submission wakes
it (the 1 s timeout only re-checks the stop flag and covers a lost wake-up).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

from tx_server.db.database import Database
from tx_server.settings import Settings
from tx_server.work_queue import WorkQueue
from tx_server.worker.executor import HANDLED_TYPES, Executor

__all__ = ["run_worker", "worker_thread"]

log = logging.getLogger(__name__)
CLAIM_LIMIT = 64
RECHECK_SECONDS = 1.0


def run_worker(
    settings: Settings, stop: threading.Event, ready: threading.Event | None = None
) -> None:
    """Serve the queue of ``settings.database_url`` until ``stop`` is set."""
    db = Database(settings.database_url)
    queue = WorkQueue(db)
    try:
        executor = Executor(settings, queue)
        requeued = queue.requeue_running()
        if requeued:
            log.warning("requeued %d requests left running by a previous worker", requeued)
        with queue.subscribe_work() as work:
            if ready is not None:
                ready.set()
            while not stop.is_set():
                claimed = queue.claim_pending(limit=CLAIM_LIMIT, request_types=HANDLED_TYPES)
                if claimed:
                    executor.run(claimed)
                    continue
                work.wait(timeout=RECHECK_SECONDS)
    finally:
        queue.bus.close()
        db.dispose()


@contextlib.contextmanager
def worker_thread(settings: Settings) -> Iterator[threading.Thread]:
    """Run the worker in a daemon thread of this process (tests); stopped on exit."""
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(
        target=run_worker, args=(settings, stop, ready), name="tx-worker", daemon=True
    )
    thread.start()
    if not ready.wait(timeout=60):
        raise RuntimeError("the worker thread did not start")
    try:
        yield thread
    finally:
        stop.set()
        thread.join(timeout=30)
