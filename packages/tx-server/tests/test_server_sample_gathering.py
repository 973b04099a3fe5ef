"""Which claims with sampling requests wait for followers (:mod:`tx_server.worker.gathering`).

A group of concurrent requests must still run as one batch; a client that waits for each
answer before it sends the next request must stop paying the gather window after a few
requests. The unit tests drive :class:`LoneSessions` with claimed requests; the live test runs
the official SDK against a server whose gather window is wide (0.5 s), so waiting and not
waiting differ by far more than a request's run time on any machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
import tinker
from sqlalchemy import select
from tinker import types

from tx_server.db.database import Database
from tx_server.db.models import FutureRow
from tx_server.settings import EngineSettings
from tx_server.testing import RunningServer, run_hub_model_server
from tx_server.work_queue import ClaimedRequest
from tx_server.worker.gathering import LoneSessions

BASE = "Qwen/Qwen3-8B"
GAP = 0.5


def _request(session: str, created_at: datetime, n: int = 0) -> ClaimedRequest:
    return ClaimedRequest(
        request_id=f"{session}-{n}",
        request_type="sample",
        tenant_id="t",
        session_id="s",
        model_id=None,
        seq_id=n,
        model_seq_id=None,
        sampling_session_id=session,
        barrier=False,
        payload=b"",
        payload_content_type="application/json",
        created_at=created_at,
    )


def _after_answer(session: str) -> ClaimedRequest:
    """A request of ``session`` created after its last answer, as a sequential client's next
    request is."""
    return _request(session, datetime.now(UTC) + timedelta(seconds=1))


def _make_lone(lone: LoneSessions, session: str) -> None:
    lone.answered([_request(session, datetime.now(UTC))])
    for _ in range(LoneSessions.LONE_AFTER):
        request = _after_answer(session)
        lone.skip_gather([request])
        lone.answered([request])


def test_a_session_that_waits_for_each_answer_stops_gathering() -> None:
    lone = LoneSessions()
    first = _request("a", datetime.now(UTC))
    assert not lone.skip_gather([first])  # nothing known yet
    lone.answered([first])
    for _ in range(LoneSessions.LONE_AFTER - 1):  # not enough sequential requests yet
        request = _after_answer("a")
        assert not lone.skip_gather([request])
        lone.answered([request])
    request = _after_answer("a")
    assert lone.skip_gather([request])
    lone.answered([request])
    naive_utc = (datetime.now(UTC) + timedelta(seconds=1)).replace(tzinfo=None)  # as stored
    assert lone.skip_gather([_request("a", naive_utc)])


def test_a_session_that_sent_a_group_gathers_for_good() -> None:
    """RL loops sample lone requests too between their groups: once a session has sent
    requests together, a claim of its requests always waits for followers."""
    lone = LoneSessions()
    _make_lone(lone, "a")
    # Created before the last answer: it was in flight beside the answered request.
    concurrent = _request("a", datetime.now(UTC) - timedelta(seconds=5))
    assert not lone.skip_gather([concurrent])
    lone.answered([concurrent])
    _make_lone(lone, "a")
    assert not lone.skip_gather([_after_answer("a")])
    # Two requests of a session in one claim: a group as well.
    lone.answered([_request("b", datetime.now(UTC))])
    assert not lone.skip_gather([_after_answer("b"), _after_answer("b")])
    _make_lone(lone, "b")
    assert not lone.skip_gather([_after_answer("b")])


def test_followers_gathered_behind_a_sequential_request_make_a_group() -> None:
    """The first request of a group can be claimed alone and look sequential; the followers
    gathered behind it show the group."""
    lone = LoneSessions()
    lone.answered([_request("a", datetime.now(UTC))])
    for _ in range(LoneSessions.LONE_AFTER + 1):
        first = _after_answer("a")
        assert not lone.skip_gather([first])
        lone.answered([first, _after_answer("a"), _after_answer("a")])  # with its followers


def test_a_claim_gathers_unless_all_its_sessions_are_lone() -> None:
    lone = LoneSessions()
    _make_lone(lone, "a")
    assert not lone.skip_gather([_after_answer("a"), _request("new", datetime.now(UTC))])


def test_the_least_recently_answered_sessions_are_forgotten() -> None:
    lone = LoneSessions()
    lone.MAX_SESSIONS = 2
    _make_lone(lone, "a")
    assert lone.skip_gather([_after_answer("a")])
    for session in ("b", "c"):
        lone.answered([_request(session, datetime.now(UTC))])
    assert not lone.skip_gather([_after_answer("a")])  # forgotten: unknown again


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    engine = EngineSettings(
        max_lora_rank=8, max_lora_adapters=2, max_seq_len=256, sample_tokens_per_batch=2048
    )
    root = tmp_path_factory.mktemp("gathering")
    with run_hub_model_server(
        root, base_models=[BASE], engine=engine, sample_gather_seconds=GAP
    ) as server:
        yield server


def _last_samples(server: RunningServer, n: int) -> list[tuple[datetime, datetime]]:
    """``(started_at, finished_at)`` of the last ``n`` sample requests, oldest first: the
    worker's claim and its answer."""
    db = Database(server.settings.database_url)
    with db.core_read() as conn:
        rows = conn.execute(
            select(FutureRow.started_at, FutureRow.finished_at)
            .where(FutureRow.request_type == "sample")
            .order_by(FutureRow.id.desc())
            .limit(n)
        ).all()
    db.dispose()
    return [(r.started_at, r.finished_at) for r in reversed(rows)]


def _wait_until_claimed(server: RunningServer, samples_before: int) -> None:
    """Until the worker has claimed a sample request beyond the first ``samples_before``."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        rows = _last_samples(server, 1_000_000)
        if len(rows) > samples_before and rows[samples_before][0] is not None:
            return
        time.sleep(0.005)
    raise AssertionError("the worker did not claim the request within 60 s")


def test_sequential_requests_stop_waiting_and_groups_still_run_as_one_batch(
    live: RunningServer, sdk_service: Callable[[RunningServer], tinker.ServiceClient]
) -> None:
    sc = sdk_service(live)
    sampler = sc.create_sampling_client(base_model=BASE).result()
    prompt = types.ModelInput.from_ints([5, 17, 42])
    params = types.SamplingParams(max_tokens=4, seed=0, stop=[])
    n = LoneSessions.LONE_AFTER
    for _ in range(n + 2):
        sampler.sample(prompt, num_samples=1, sampling_params=params).result(timeout=120)
    waits = [(done - claimed).total_seconds() for claimed, done in _last_samples(live, n + 2)]
    # The first ones wait out the window; then the session counts as lone.
    assert min(waits[:n]) >= GAP
    assert max(waits[n:]) < GAP / 2

    # A group whose first request starts alone (the session is lone; a long request, so the
    # rest, submitted once it is claimed, join its running batch — on this machine at least:
    # claimed apart, they would mark the session grouped as well). Joined requests count as
    # sent together with it.
    before = len(_last_samples(live, 1_000_000))
    long = types.SamplingParams(max_tokens=240, seed=9, stop=[])
    first = sampler.sample(prompt, num_samples=1, sampling_params=long)
    _wait_until_claimed(live, before)
    group = [types.SamplingParams(max_tokens=4, seed=s, stop=[]) for s in range(4)]
    rest = [sampler.sample(prompt, num_samples=1, sampling_params=p) for p in group[1:]]
    for future in [first, *rest]:
        future.result(timeout=120)

    # So the session's next group is gathered: one batch, claimed by a claim that waited out
    # the window behind its last request (a lone session's claim starts at once).
    futures = [sampler.sample(prompt, num_samples=1, sampling_params=p) for p in group]
    for future in futures:
        future.result(timeout=120)
    rows = _last_samples(live, 4)
    assert max(claimed for claimed, _ in rows) < min(done for _, done in rows)
    assert min((done - claimed).total_seconds() for claimed, done in rows) >= GAP
