"""Worker-side queue on a real SQLite file: per-model order, transitions, pruning, wake-ups."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from tx_server.db.database import Database
from tx_server.db.models import FutureRow, FutureStatus, utcnow
from tx_server.errors import NotFoundError, ServerFaultError, failure_message
from tx_server.futures import JSON, FutureStore, RequestType, Submission
from tx_server.wake import SyncSubscription, wake_bus_for
from tx_server.work_queue import WorkQueue, prune_finished

T = RequestType


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'q.db'}")
    database.upgrade()
    yield database
    database.dispose()


@pytest.fixture
def store(db: Database) -> FutureStore:
    return FutureStore(db, wake_bus_for(db))


@pytest.fixture
def queue(db: Database) -> WorkQueue:
    return WorkQueue(Database(str(db.url)))


def _put(store: FutureStore, model: str | None, seq: int, rtype: RequestType) -> str:
    if model is None:
        return store.submit("t", Submission(rtype, b"{}", sampling_session_id="ss", seq_id=seq))
    return store.submit("t", Submission(rtype, b"{}", model_id=model, seq_id=seq))


def _ids(claimed: list) -> list[str]:  # type: ignore[type-arg]
    return [c.request_id for c in claimed]


def test_barriers_order_requests_per_model_only(store: FutureStore, queue: WorkQueue) -> None:
    a1 = _put(store, "A", 1, T.FORWARD_BACKWARD)
    a2 = _put(store, "A", 2, T.FORWARD_BACKWARD)
    a_opt = _put(store, "A", 3, T.OPTIM_STEP)
    a4 = _put(store, "A", 4, T.FORWARD)
    b_opt = _put(store, "B", 1, T.OPTIM_STEP)
    b2 = _put(store, "B", 2, T.FORWARD_BACKWARD)
    s0 = _put(store, None, 0, T.SAMPLE)

    # Both fwd/bwd of A, B's leading barrier and the sample; nothing behind a barrier.
    assert _ids(queue.claim_pending()) == [a1, a2, b_opt, s0]
    assert queue.claim_pending() == []  # A's optim waits for a1, a2; b2 waits for b_opt
    queue.complete(a1, b"{}", JSON)
    assert queue.claim_pending() == []  # a2 still running
    queue.complete(b_opt, b"{}", JSON)
    assert _ids(queue.claim_pending()) == [b2]
    queue.fail(a2, "bad input", "user")  # a failure also releases the barrier
    assert _ids(queue.claim_pending()) == [a_opt]
    assert queue.claim_pending() == []  # a4 waits for the running optim_step
    queue.complete(a_opt, b"{}", JSON)
    claimed = queue.claim_pending()
    assert _ids(claimed) == [a4]
    assert (claimed[0].model_id, claimed[0].seq_id, claimed[0].request_type) == ("A", 4, "forward")


def test_limit_and_type_filter_keep_the_order(store: FutureStore, queue: WorkQueue) -> None:
    fb = [_put(store, "A", i, T.FORWARD_BACKWARD) for i in range(1, 4)]
    opt = _put(store, "A", 4, T.OPTIM_STEP)
    sample = _put(store, None, 0, T.SAMPLE)
    assert _ids(queue.claim_pending(request_types={"sample"})) == [sample]
    assert _ids(queue.claim_pending(limit=2)) == fb[:2]
    assert _ids(queue.claim_pending(request_types={"optim_step"})) == []
    assert _ids(queue.claim_pending()) == [fb[2]]
    for rid in fb:
        queue.complete(rid, b"{}", JSON)
    assert _ids(queue.claim_pending()) == [opt]
    with pytest.raises(ValueError, match="limit must be >= 1"):
        queue.claim_pending(limit=0)


def test_through_barriers_claims_an_idle_models_backlog_in_order(
    store: FutureStore, queue: WorkQueue
) -> None:
    a1 = _put(store, "A", 1, T.FORWARD_BACKWARD)
    a_opt = _put(store, "A", 2, T.OPTIM_STEP)
    a3 = _put(store, "A", 3, T.FORWARD_BACKWARD)
    b1 = _put(store, "B", 1, T.FORWARD_BACKWARD)
    a_save = _put(store, "A", 4, T.SAVE_WEIGHTS)
    b_opt = _put(store, "B", 2, T.OPTIM_STEP)
    b3 = _put(store, "B", 3, T.FORWARD)
    wanted = {"forward", "forward_backward", "optim_step"}
    # A's prefix ends at the save (not wanted here); B's backlog goes whole.
    claimed = queue.claim_pending(request_types=wanted, through_barriers=True)
    assert _ids(claimed) == [a1, a_opt, a3, b1, b_opt, b3]
    b4 = _put(store, "B", 4, T.FORWARD)
    b_opt5 = _put(store, "B", 5, T.OPTIM_STEP)
    # A model with requests running falls back to the segment rules: nothing behind B's
    # running optim_step, no barrier of A while A runs.
    assert queue.claim_pending(through_barriers=True) == []
    for rid in (a1, a_opt, a3, b1, b_opt):
        queue.complete(rid, b"{}", JSON)
    # A is idle again: its save goes; B still runs b3, so only its next pass joins.
    assert _ids(queue.claim_pending(through_barriers=True)) == [a_save, b4]
    for rid in (b3, b4):
        queue.complete(rid, b"{}", JSON)
    assert _ids(queue.claim_pending(through_barriers=True)) == [b_opt5]


def test_transitions_are_checked(store: FutureStore, queue: WorkQueue) -> None:
    rid = _put(store, "A", 1, T.OPTIM_STEP)
    with pytest.raises(ValueError, match="content_type"):
        queue.complete(rid, b"{}", "text/plain")
    with pytest.raises(ValueError, match="category"):
        queue.fail(rid, "x", "oops")  # type: ignore[arg-type]
    with pytest.raises(NotFoundError):
        queue.complete("missing", b"{}", JSON)
    queue.complete(rid, b"{}", JSON)
    with pytest.raises(ServerFaultError, match="already finished"):
        queue.fail(rid, "late", "server")


def test_complete_many_stores_every_result_in_one_transaction(
    store: FutureStore, queue: WorkQueue
) -> None:
    first, second, done = (_put(store, "A", i, T.FORWARD) for i in (1, 2, 3))
    queue.claim_pending()
    queue.complete(done, b"{}", JSON)
    with pytest.raises(ValueError, match="content_type"):
        queue.complete_many([(first, b"{}", "text/plain")])
    with pytest.raises(ServerFaultError, match=done):
        queue.complete_many([(first, b'{"a": 1}', JSON), (done, b"{}", JSON), (second, b"2", JSON)])
    for rid, result in ((first, b'{"a": 1}'), (second, b"2")):  # stored despite the bad one
        assert store.outcome("t", rid) is not None
        with queue.db.read() as session:
            row = session.scalar(select(FutureRow).where(FutureRow.request_id == rid))
            assert row is not None
            assert (row.status, row.result) == (FutureStatus.COMPLETED, result)


def test_submission_wakes_a_waiting_worker(store: FutureStore, queue: WorkQueue) -> None:
    with queue.subscribe_work() as work:
        timer = threading.Timer(0.2, _put, (store, "M", 1, T.FORWARD_BACKWARD))
        started = time.perf_counter()
        timer.start()
        messages = work.wait(timeout=10.0)
        elapsed = time.perf_counter() - started
        timer.join()
    assert messages == ["M"]
    assert elapsed < 2.0
    assert queue.claim_pending()[0].model_id == "M"


def test_a_non_blocking_read_returns_at_once_and_sees_later_submissions(
    store: FutureStore, queue: WorkQueue
) -> None:
    """``wait(timeout=0.0)`` is what a sampling batch asks before every decode step."""
    with queue.subscribe_work() as work:
        started = time.perf_counter()
        assert work.wait(timeout=0.0) == []
        assert time.perf_counter() - started < 0.1
        _put(store, "M", 1, T.FORWARD_BACKWARD)
        assert _poll(work) == ["M"]


def _poll(work: SyncSubscription, seconds: float = 10.0) -> list[str]:
    """Non-blocking reads until one returns messages (delivery is asynchronous)."""
    deadline = time.monotonic() + seconds
    while not (messages := work.wait(timeout=0.0)):
        assert time.monotonic() < deadline, "the submission never arrived"
        time.sleep(0.001)
    return messages


def test_pruning_deletes_only_old_finished_futures(
    db: Database, store: FutureStore, queue: WorkQueue
) -> None:
    old_done, new_done, old_pending = (_put(store, "A", i, T.FORWARD) for i in (1, 2, 3))
    queue.claim_pending()
    queue.complete(old_done, b"{}", JSON)
    queue.fail(new_done, "x", "server")
    with db.write() as s:
        s.execute(
            update(FutureRow)
            .where(FutureRow.request_id.in_([old_done, old_pending]))
            .values(finished_at=utcnow() - timedelta(days=30))
        )
        s.execute(
            update(FutureRow)
            .where(FutureRow.request_id == old_pending)
            .values(status=FutureStatus.RUNNING)
        )
    assert prune_finished(db, timedelta(days=7)) == 1
    with db.read() as s:
        left = set(s.scalars(select(FutureRow.request_id)))
    assert left == {new_done, old_pending}


def test_a_failing_server_file_is_reported_without_its_path() -> None:
    """A disk-full or permission error while saving named the server's checkpoint path to the
    client (another tenant's run id included); the reason stays, the path goes to the log."""
    full = OSError(28, "No space left on device", "/srv/tx/checkpoints/s:train:0/weights/a")
    message = failure_message(full)
    assert "No space left on device" in message
    assert "/srv" not in message
    assert "/srv" not in failure_message(PermissionError(13, "Permission denied", "a", "/srv/b"))
    assert failure_message(OSError("plain")) == "plain"  # no file named: unchanged
