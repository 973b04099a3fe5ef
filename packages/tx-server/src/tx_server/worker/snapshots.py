"""Recovery snapshots on disk, cut when the worker is idle and written by a background thread.

Why off the request path: a snapshot is an adapter-sized copy and write (weights + both AdamW
moments). Written before completing every ``optim_step``, it sat on each training step's round
trip (15 ms for the tiny model on a 2-core CPU, hundreds of ms for larger adapters); even just
*cutting* the slot out of the engine state costs a dispatch over every leaf (~9 ms on an H100
host for the small preset), paid per tenant per step. Now a step only marks its run as changed
(:meth:`~tx_server.worker.engines.EngineHost.snapshot`); once no request has arrived for
:data:`IDLE_GRACE_SECONDS` the worker loop cuts every changed run and hands the cuts to
:class:`SnapshotWriter`, whose thread copies them to the host and writes them (also only while
the worker stays idle). A run that stays busy is cut at the latest :data:`MAX_LAG_SECONDS` after
its first unsnapshotted change.

What makes that safe is the replay rule of :mod:`tx_server.worker.recovery`: a restore starts
from the newest snapshot of a *completed* barrier that is on disk and replays every completed
``forward_backward`` and ``optim_step`` after it, so steps whose snapshot was not yet taken or
written when the worker died are re-applied, not lost. ``load_weights`` (whose source
checkpoint may be gone by the time of a replay) passes ``wait=True``: cut and written at once.

Layout: ``{root}/{model_id}/recovery/{request_id}/`` written through a temporary directory and a
rename, so a half-written snapshot is never read. The writer keeps the two newest of a run (by
mtime, so this holds across restarts): the newest may belong to a barrier that never completed
(the worker died first), and the restore then needs the one before. Jobs of one run are
coalesced — only the newest pending state is written — so a slow disk never queues more than
one copy per run.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tx_engine.checkpoint import AdapterState, save_adapter
from tx_server.errors import ServerFaultError

__all__ = ["SnapshotWriter", "snapshot_dir", "snapshot_owners"]

log = logging.getLogger(__name__)

_RECOVERY = "recovery"
MAX_LAG_SECONDS = 10.0
"""How long a busy worker may leave a run's newest state unwritten (a restart replays it)."""
IDLE_GRACE_SECONDS = 0.2
"""How long the worker must have been idle before a snapshot is written."""


def snapshot_dir(root: Path, model_id: str) -> Path:
    """The directory holding ``model_id``'s snapshots (one subdirectory per request id)."""
    if "/" in model_id or model_id in ("", ".", ".."):
        raise ServerFaultError(f"model id {model_id!r} cannot name a directory")
    return root / model_id / _RECOVERY


def snapshot_owners(root: Path) -> list[str]:
    """The model ids that have a snapshot directory under ``root``."""
    if not root.is_dir():
        return []
    return sorted(p.parent.name for p in root.glob(f"*/{_RECOVERY}") if p.is_dir())


@dataclass(frozen=True)
class _Job:
    model_id: str
    request_id: str
    state: Callable[[], AdapterState]
    """Copies the state to the host (``TrainingEngine.adapter_state_later``), in the writer."""
    queued_at: float
    """When the run's oldest unwritten state was queued (kept when a newer one replaces it)."""


class SnapshotWriter:
    """One daemon thread writing the newest pending snapshot of each run, oldest run first.

    It writes once the worker has been idle for ``idle_grace`` seconds (:meth:`set_worker_busy`),
    or once a run's oldest unwritten state has waited ``max_lag`` seconds, or when someone waits
    for it: the copy and the file writing hold the GIL in stretches (Python hands it over every
    5 ms), so a write that overlaps a request costs that request milliseconds. The grace keeps
    writes out of the short gaps of a client that steps in a loop (measured on an H100 host: a
    45 ms write started in every gap doubled the ``optim_step`` round trip).
    """

    def __init__(
        self, root: Path, max_lag: float = MAX_LAG_SECONDS, idle_grace: float = IDLE_GRACE_SECONDS
    ) -> None:
        self.root = root
        self.max_lag = max_lag
        self.idle_grace = idle_grace
        self._idle_since = time.monotonic()
        self._pending: dict[str, _Job] = {}
        self._writing: str | None = None
        self._cv = threading.Condition()
        self._closed = False
        self._worker_busy = False
        self._waiters = 0
        self._thread = threading.Thread(target=self._run, name="tx-snapshots", daemon=True)
        self._thread.start()

    def submit(
        self, model_id: str, request_id: str, state: Callable[[], AdapterState], wait: bool
    ) -> None:
        """Queue ``state`` as the snapshot of barrier ``request_id``; ``wait``: until on disk."""
        snapshot_dir(self.root, model_id)  # validate the name now, in the caller's request
        with self._cv:
            if self._closed:
                raise ServerFaultError("the snapshot writer is closed")
            replaced = self._pending.pop(model_id, None)  # re-inserted last: served in order
            queued_at = replaced.queued_at if replaced is not None else time.monotonic()
            self._pending[model_id] = _Job(model_id, request_id, state, queued_at)
            self._cv.notify_all()
        if wait:
            self.flush(model_id)
            if not (snapshot_dir(self.root, model_id) / request_id).is_dir():
                raise ServerFaultError(
                    f"writing the recovery snapshot of model {model_id!r} failed; see the log"
                )

    def set_worker_busy(self, busy: bool) -> None:
        """The worker loop says whether it is running requests (writes wait) or idle."""
        with self._cv:
            if busy != self._worker_busy:
                self._worker_busy = busy
                self._idle_since = time.monotonic()
                self._cv.notify_all()

    def flush(self, model_id: str | None = None) -> None:
        """Block until nothing of ``model_id`` (None: of any run) is pending or being written."""
        with self._cv:
            self._waiters += 1
            self._cv.notify_all()
            try:
                self._cv.wait_for(lambda: not self._busy(model_id))
            finally:
                self._waiters -= 1

    def drop(self, model_id: str) -> None:
        """Forget a run: cancel its pending snapshot and delete those on disk."""
        with self._cv:
            self._pending.pop(model_id, None)
            self._cv.wait_for(lambda: self._writing != model_id)
            shutil.rmtree(snapshot_dir(self.root, model_id), ignore_errors=True)

    def close(self) -> None:
        """Write what is pending, then stop the thread."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join()

    def _busy(self, model_id: str | None) -> bool:
        if model_id is None:
            return bool(self._pending) or self._writing is not None
        return model_id in self._pending or self._writing == model_id

    def _wait_before_writing(self) -> float:
        """Seconds until a write is allowed (0: now), ignoring the ``max_lag`` deadline."""
        if self._closed or self._waiters > 0:
            return 0.0
        if self._worker_busy:
            return self.max_lag  # until woken by set_worker_busy (or the deadline)
        return max(0.0, self._idle_since + self.idle_grace - time.monotonic())

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: bool(self._pending) or self._closed)
                if not self._pending:
                    return  # closed and drained
                deadline = min(j.queued_at for j in self._pending.values()) + self.max_lag
                while self._pending and (delay := self._wait_before_writing()) > 0:
                    if time.monotonic() >= deadline:
                        break  # the oldest state waited long enough: write it now
                    self._cv.wait(min(delay, deadline - time.monotonic()))
                if not self._pending:
                    continue  # dropped meanwhile
                model_id = next(iter(self._pending))
                job = self._pending.pop(model_id)
                self._writing = model_id
            try:
                self._write(job)
            except Exception:
                log.exception("recovery snapshot %s of %s failed", job.request_id, model_id)
            finally:
                with self._cv:
                    self._writing = None
                    self._cv.notify_all()

    def _write(self, job: _Job) -> None:
        base = snapshot_dir(self.root, job.model_id)
        tmp = base / f".{job.request_id}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapter(tmp, job.state())
        shutil.rmtree(base / job.request_id, ignore_errors=True)
        os.replace(tmp, base / job.request_id)
        older = sorted(
            (p for p in base.iterdir() if p.name != job.request_id and not p.name.startswith(".")),
            key=lambda p: p.stat().st_mtime_ns,
        )
        for old in older[:-1]:  # keep the newest older one (see the module docstring)
            shutil.rmtree(old, ignore_errors=True)
