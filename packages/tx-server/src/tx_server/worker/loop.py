"""The worker's main loop, run as a process (``python -m tx_server.worker``) or a thread.

Start-up fails the requests a dead worker left ``running`` (category ``server``: they may have
half-applied; the client resubmits) and clears every recorded adapter slot, since this worker
holds none yet; live training runs are restored into slots on first use
(:mod:`tx_server.worker.recovery`). Then: claim everything runnable, execute it, and block on
the work subscription until a submission wakes it (the 1 s timeout re-checks the stop flag,
covers a lost wake-up, and lets the worker free the slots of finished sessions while idle).
A claim with sampling requests first gathers what is submitted right after it, so a group of
concurrent sample requests runs as one batch, unless its sessions sample one request at a
time (:mod:`.gathering`); while it decodes, the work subscription lets training and further
sample requests in between its steps (:mod:`.interleave`).
Runs changed since their last recovery snapshot are cut once no submission has come for
``IDLE_GRACE_SECONDS`` (:mod:`tx_server.worker.snapshots`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

from tx_server.db.database import Database
from tx_server.settings import Settings
from tx_server.work_queue import RESTART_MESSAGE, WorkQueue
from tx_server.worker.executor import Executor
from tx_server.worker.gathering import LoneSessions, claim, gather_followers, sample_requests
from tx_server.worker.snapshots import IDLE_GRACE_SECONDS

__all__ = ["run_worker", "worker_thread"]

log = logging.getLogger(__name__)
CLAIM_LIMIT = 64
RECHECK_SECONDS = 1.0
SWEEP_SECONDS = 1.0
"""How often (at most) to look for runs whose session finished or that were unloaded."""


def run_worker(
    settings: Settings, stop: threading.Event, ready: threading.Event | None = None
) -> None:
    """Serve the queue of ``settings.database_url`` until ``stop`` is set."""
    db = Database(settings.database_url)
    queue = WorkQueue(db)
    executor: Executor | None = None
    try:
        executor = Executor(settings, queue)
        failed = queue.fail_running(RESTART_MESSAGE)
        if failed:
            log.warning("failed %d requests left running by a previous worker", failed)
        executor.host.recovery.clear_slots()
        host = executor.host
        lone = LoneSessions()
        swept_at = 0.0
        with queue.subscribe_work() as work:
            if ready is not None:
                ready.set()
            while not stop.is_set():
                if time.monotonic() - swept_at >= SWEEP_SECONDS:
                    executor.sweep()
                    swept_at = time.monotonic()
                claimed = claim(queue, CLAIM_LIMIT)
                samples = sample_requests(claimed)
                if samples and not lone.skip_gather(samples):
                    claimed += gather_followers(
                        queue, work, settings.sample_gather_seconds, CLAIM_LIMIT - len(claimed)
                    )
                host.snapshots.set_worker_busy(bool(claimed))  # they are written while idle
                if claimed:
                    lone.answered(executor.run(claimed, work))
                    continue
                if host.snapshots_due:  # cut them once no request came for a moment
                    if not work.wait(timeout=IDLE_GRACE_SECONDS):
                        host.cut_snapshots()
                    continue
                work.wait(timeout=RECHECK_SECONDS)
    finally:
        if executor is not None:
            executor.host.close()  # pending recovery snapshots reach the disk
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
