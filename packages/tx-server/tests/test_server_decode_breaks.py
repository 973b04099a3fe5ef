"""What is submitted while a long sampling batch decodes runs between its decode steps.

Live tests: the unmodified tinker SDK 0.38.0 against uvicorn on 127.0.0.1 and the worker in a
thread, serving the kit's tiny Qwen3 as ``Qwen/Qwen3-8B``. A 600-token sample decodes; a
``forward_backward`` + ``optim_step`` submitted meanwhile, or a short sample request (into a
row of the batch that is free, or that the batch grows by), must finish before it, with the
results they get alone. The unit
tests pin the policy of :class:`~tx_server.worker.interleave.DecodeBreaks` with a manual clock.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import tinker
from sqlalchemy import select
from tinker import types

from tx_server.db.database import Database
from tx_server.db.models import FutureRow, FutureStatus
from tx_server.settings import EngineSettings
from tx_server.testing import RunningServer, run_hub_model_server
from tx_server.work_queue import ClaimedRequest
from tx_server.worker.interleave import DecodeBreaks
from tx_server.worker.slots import SamplerSlots

BASE = "Qwen/Qwen3-8B"
LONG = types.SamplingParams(max_tokens=600, seed=7, stop=[])
PROMPT = types.ModelInput.from_ints([5, 17, 42, 9, 101])
TOKENS = [5, 17, 42, 9, 101, 77, 3, 250, 64, 12, 33, 8]
DATUM = types.Datum(
    model_input=types.ModelInput.from_ints(TOKENS[:-1]),
    loss_fn_inputs={
        "target_tokens": types.TensorData(data=TOKENS[1:], dtype="int64"),
        "weights": types.TensorData(data=[1.0] * (len(TOKENS) - 1), dtype="float32"),
    },
)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    engine = EngineSettings(
        max_lora_rank=8, max_lora_adapters=8, max_seq_len=1024, sample_tokens_per_batch=2048
    )
    root = tmp_path_factory.mktemp("interleave")
    # A wide gather window: requests sent together surely form one batch on any machine.
    with run_hub_model_server(
        root, base_models=[BASE], engine=engine, sample_gather_seconds=0.1
    ) as server:
        yield server


def _rows(server: RunningServer, request_types: Sequence[str]) -> list[FutureRow]:
    db = Database(server.settings.database_url)
    try:
        with db.core_read() as conn:
            return list(
                conn.execute(
                    select(FutureRow.request_type, FutureRow.status, FutureRow.finished_at)
                    .where(FutureRow.request_type.in_(request_types))
                    .order_by(FutureRow.id)
                ).all()
            )
    finally:
        db.dispose()


def _wait_until_running(server: RunningServer, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(r.status == FutureStatus.RUNNING for r in _rows(server, ["sample"])):
        assert time.monotonic() < deadline, "the sample request was never claimed"
        time.sleep(0.005)


def test_training_runs_between_the_decode_steps_of_a_long_sample(
    live: RunningServer,
    sdk_service: Callable[[RunningServer], tinker.ServiceClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    sc = sdk_service(live)
    sampler = sc.create_sampling_client(base_model=BASE).result(timeout=120)
    tc = sc.create_lora_training_client(BASE, rank=8, seed=1).result(timeout=120)
    alone = sampler.sample(PROMPT, 1, LONG).result(timeout=120).sequences[0]  # and compiles
    loss_before = tc.forward([DATUM], "cross_entropy").result(timeout=120).metrics["loss:sum"]
    tc.forward_backward([DATUM], "cross_entropy").result(timeout=120)  # compiles the step
    tc.optim_step(types.AdamParams(learning_rate=0.0)).result(timeout=120)

    caplog.set_level(logging.INFO, logger="tx_server.worker.interleave")
    long_future = sampler.sample(PROMPT, 1, LONG)
    _wait_until_running(live)
    time.sleep(0.3)  # past the worker's gather window: the batch is decoding now
    fb = tc.forward_backward([DATUM], "cross_entropy")
    step = tc.optim_step(types.AdamParams(learning_rate=1e-2))
    fb_loss = fb.result(timeout=120).metrics["loss:sum"]
    step.result(timeout=120)
    during = long_future.result(timeout=120).sequences[0]

    sample_row = _rows(live, ["sample"])[-1]
    training = _rows(live, ["forward_backward", "optim_step"])[-2:]
    assert sorted(r.request_type for r in training) == ["forward_backward", "optim_step"]
    assert all(r.finished_at < sample_row.finished_at for r in training), (
        "training waited for the whole sample"
    )
    assert any("between decode steps" in r.getMessage() for r in caplog.records)
    assert during.tokens == alone.tokens
    assert len(during.tokens) == LONG.max_tokens
    assert fb_loss == pytest.approx(loss_before, rel=1e-6)
    loss_after = tc.forward([DATUM], "cross_entropy").result(timeout=120).metrics["loss:sum"]
    assert loss_after < loss_before  # the step between decode steps was applied


@pytest.fixture
def two_slots(tmp_path: Path) -> Iterator[RunningServer]:
    engine = EngineSettings(
        max_lora_rank=8, max_lora_adapters=2, max_seq_len=1024, sample_tokens_per_batch=2048
    )
    with run_hub_model_server(
        tmp_path, base_models=[BASE], engine=engine, sample_gather_seconds=0.1
    ) as server:
        yield server


def test_requests_that_find_every_slot_pinned_by_the_batch_run_after_it(
    two_slots: RunningServer,
    sdk_service: Callable[[RunningServer], tinker.ServiceClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two slots, both holding samplers that a long batch reads (the two training runs
    parked to make room). A ``forward_backward`` of one run, and a sample request of a third
    sampler joining the batch, find no slot they may take: instead of failing they run once
    the batch is over, with the results they get alone."""
    sc = sdk_service(two_slots)
    runs = [sc.create_lora_training_client(BASE, rank=8, seed=s).result(timeout=120) for s in (1, 2)]  # fmt: skip
    expected_loss = runs[0].forward([DATUM], "cross_entropy").result(timeout=120).metrics["loss:sum"]  # fmt: skip
    samplers = [tc.save_weights_and_get_sampling_client().result(timeout=120) for tc in runs]
    third = runs[1].save_weights_and_get_sampling_client().result(timeout=120)  # another path
    short = types.SamplingParams(max_tokens=8, seed=3, stop=[])
    alone = third.sample(PROMPT, 1, short).result(timeout=120).sequences[0]
    for sampler in samplers:  # compiles, and leaves both samplers in the slots
        sampler.sample(PROMPT, 1, LONG).result(timeout=120)

    caplog.set_level(logging.INFO, logger="tx_server.worker")
    long = [sampler.sample(PROMPT, 1, LONG) for sampler in samplers]
    _wait_until_running(two_slots)
    time.sleep(0.3)  # past the worker's gather window: the batch is decoding now
    fb = runs[0].forward_backward([DATUM], "cross_entropy")
    joiner = third.sample(PROMPT, 1, short)

    assert fb.result(timeout=120).metrics["loss:sum"] == pytest.approx(expected_loss, rel=1e-6)
    assert joiner.result(timeout=120).sequences[0].tokens == alone.tokens
    for future in long:
        assert len(future.result(timeout=120).sequences[0].tokens) == LONG.max_tokens
    messages = [r.getMessage() for r in caplog.records]
    assert any("found no free adapter slot run after the sampling batch" in m for m in messages)
    assert any("sample requests that found no free adapter slot run now" in m for m in messages)
    sample_end = max(r.finished_at for r in _rows(two_slots, ["sample"])[-3:-1])
    fb_row = _rows(two_slots, ["forward_backward"])[-1]
    assert fb_row.status == FutureStatus.COMPLETED
    assert fb_row.finished_at >= sample_end


JOINING = types.SamplingParams(max_tokens=30, seed=9, stop=[])


def _last_samples_by_seed(server: RunningServer, n: int) -> dict[int | None, Any]:
    """The database rows of the last ``n`` sample requests, by their sampling seed. The SDK
    sends a batch's requests concurrently, so either may be stored first: rows are told apart
    by what they asked for, not by their order."""
    db = Database(server.settings.database_url)
    with db.core_read() as conn:
        rows = conn.execute(
            select(FutureRow.payload, FutureRow.status, FutureRow.started_at, FutureRow.finished_at)
            .where(FutureRow.request_type == "sample")
            .order_by(FutureRow.id.desc())
            .limit(n)
        ).all()
    db.dispose()
    return {json.loads(r.payload)["request"]["sampling_params"]["seed"]: r for r in rows}


def _batch_then_join(
    server: RunningServer, batch: tinker.SamplingClient, joiner: tinker.SamplingClient
) -> tuple[list[int], Any, Any]:
    """Two 600-token requests on ``batch`` form one 2-row batch, and one stops early on a stop
    token; once it is answered, a ``JOINING`` request is sent on ``joiner``. Its tokens, and
    the database rows of it and of the long request."""
    greedy = types.SamplingParams(max_tokens=8, temperature=0.0, stop=[])
    stop_token = batch.sample(PROMPT, 1, greedy).result(timeout=120).sequences[0].tokens[3]
    stopping = types.SamplingParams(max_tokens=600, temperature=0.0, stop=[stop_token])
    long_future, stop_future = (batch.sample(PROMPT, 1, p) for p in (LONG, stopping))
    assert len(stop_future.result(timeout=120).sequences[0].tokens) <= 4
    joined = joiner.sample(PROMPT, 1, JOINING).result(timeout=120).sequences[0].tokens
    long_future.result(timeout=120)
    by_seed = _last_samples_by_seed(server, 3)
    joined_row, long_row, stopped_row = by_seed[JOINING.seed], by_seed[LONG.seed], by_seed[None]
    assert joined_row.started_at > stopped_row.finished_at  # claimed while the batch ran
    return list(joined), joined_row, long_row


def test_a_sample_request_joins_the_free_rows_of_a_running_batch(
    live: RunningServer,
    sdk_service: Callable[[RunningServer], tinker.ServiceClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Once a row of a running batch is free (its rollout stopped), a short request joins it
    and is answered long before the batch ends, as rollouts that end at EOS free rows for other
    tenants' requests."""
    sampler = sdk_service(live).create_sampling_client(base_model=BASE).result(timeout=120)
    alone = sampler.sample(PROMPT, 1, JOINING).result(timeout=120).sequences[0].tokens
    caplog.set_level(logging.INFO, logger="tx_server.worker.sampling")
    _batch_then_join(live, sampler, sampler)  # compiles the joined request's admission
    joined, joined_row, long_row = _batch_then_join(live, sampler, sampler)
    assert joined_row.finished_at < long_row.finished_at, "it waited for the whole batch"
    assert any("joined a running batch" in r.getMessage() for r in caplog.records)
    assert joined == alone


def test_a_sample_request_joins_a_lone_long_request_by_growing_its_batch(
    live: RunningServer, sdk_service: Callable[[RunningServer], tinker.ServiceClient]
) -> None:
    """A 600-token request decodes alone, in a 1-row batch. A short request sent meanwhile
    has no free row to take, but the cache budget has room for a second row (2048 tokens,
    1024 slots each): the batch grows, and the short request is answered long before the
    long one ends, with the tokens it gets alone. Before, it waited for the whole batch."""
    sampler = sdk_service(live).create_sampling_client(base_model=BASE).result(timeout=120)
    alone = sampler.sample(PROMPT, 1, JOINING).result(timeout=120).sequences[0].tokens

    def long_then_join() -> tuple[list[int], Any, Any]:
        long_future = sampler.sample(PROMPT, 1, LONG)
        _wait_until_running(live)
        time.sleep(0.3)  # past the worker's gather window: the 1-row batch is decoding
        joined = sampler.sample(PROMPT, 1, JOINING).result(timeout=120).sequences[0].tokens
        assert len(long_future.result(timeout=120).sequences[0].tokens) == LONG.max_tokens
        by_seed = _last_samples_by_seed(live, 2)
        return list(joined), by_seed[JOINING.seed], by_seed[LONG.seed]

    long_then_join()  # compiles the 2-row programs
    joined, joined_row, long_row = long_then_join()
    assert joined_row.started_at > long_row.started_at  # claimed while the long one ran
    assert joined_row.finished_at < long_row.finished_at, "it waited for the whole batch"
    assert joined == alone


def test_a_bad_joining_request_fails_alone_and_the_batch_goes_on(
    live: RunningServer, sdk_service: Callable[[RunningServer], tinker.ServiceClient]
) -> None:
    """A request with a token id outside the vocabulary, sent while a batch with a free row
    decodes, fails as a user error naming the field (not its index among the batch's requests)
    before the batch ends, and the batch's requests still complete."""
    sampler = sdk_service(live).create_sampling_client(base_model=BASE).result(timeout=120)
    greedy = types.SamplingParams(max_tokens=8, temperature=0.0, stop=[])
    stop_token = sampler.sample(PROMPT, 1, greedy).result(timeout=120).sequences[0].tokens[3]
    stopping = types.SamplingParams(max_tokens=600, temperature=0.0, stop=[stop_token])
    long_future, stop_future = (sampler.sample(PROMPT, 1, p) for p in (LONG, stopping))
    stop_future.result(timeout=120)
    with pytest.raises(tinker.RequestFailedError) as bad:
        sampler.sample(types.ModelInput.from_ints([5, 10**6]), 1, JOINING).result(timeout=120)
    assert len(long_future.result(timeout=120).sequences[0].tokens) == LONG.max_tokens
    assert bad.value.category == types.RequestErrorCategory.User
    assert "failed: prompt_tokens has ids outside" in bad.value.message, bad.value.message
    by_seed = _last_samples_by_seed(live, 3)  # the bad request was sent with JOINING's seed
    long_row, bad_row = by_seed[LONG.seed], by_seed[JOINING.seed]
    assert (long_row.status, bad_row.status) == (FutureStatus.COMPLETED, FutureStatus.FAILED)
    assert bad_row.finished_at < long_row.finished_at, "it waited for the whole batch"


def test_a_joining_request_loads_its_checkpoint_between_decode_steps(
    live: RunningServer, sdk_service: Callable[[RunningServer], tinker.ServiceClient]
) -> None:
    """The batch samples one trained adapter; the joining request another, whose checkpoint is
    loaded into a slot while the batch decodes. It joins (its rank fits the batch's bucket)
    and gets exactly the tokens it gets alone: the batch read the engine state again."""
    sc = sdk_service(live)
    samplers = []
    for rank, seed in ((8, 11), (4, 12)):
        tc = sc.create_lora_training_client(BASE, rank=rank, seed=seed).result(timeout=120)
        tc.forward_backward([DATUM], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=5e-2)).result(timeout=120)
        samplers.append(tc.save_weights_and_get_sampling_client().result(timeout=120))
    batch, joiner = samplers
    first, _, _ = _batch_then_join(live, batch, joiner)  # loads the joiner's checkpoint
    again, joined_row, long_row = _batch_then_join(live, batch, joiner)
    assert joined_row.finished_at < long_row.finished_at, "it waited for the whole batch"
    alone = joiner.sample(PROMPT, 1, JOINING).result(timeout=120).sequences[0].tokens
    base = sc.create_sampling_client(base_model=BASE).result(timeout=120)
    assert first == again == list(alone)
    assert list(alone) != list(
        base.sample(PROMPT, 1, JOINING).result(timeout=120).sequences[0].tokens
    )


class _Work:
    """The work subscription's non-blocking read: the messages published since the last."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def wait(self, timeout: float) -> list[str]:
        assert timeout == 0.0, "a break check never blocks the decode loop"
        out, self.messages = self.messages, []
        return out

    def close(self) -> None:
        pass


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _breaks(share: float = 0.5, run_seconds: float = 0.0) -> tuple[DecodeBreaks, _Work, _Clock]:
    """Breaks whose every run claims one request and takes ``run_seconds`` of the clock."""
    work, clock = _Work(), _Clock()
    claimed = [
        ClaimedRequest(
            "req-1", "optim_step", "tenant", None, "model-a", 1, 1, None, True, b"{}", "json",
            datetime.now(UTC),
        )
    ]  # fmt: skip

    def execute(requests: Sequence[ClaimedRequest]) -> None:
        assert requests == claimed
        clock.now += run_seconds

    breaks = DecodeBreaks(work, lambda: claimed, execute, share=share, clock=clock)
    return breaks, work, clock


def test_a_break_is_due_only_after_a_model_request_is_submitted() -> None:
    breaks, work, _ = _breaks()
    assert not breaks.due()
    work.messages = [""]  # a sampling request: nothing to run between steps
    assert not breaks.due()
    work.messages = ["model-a"]
    assert breaks.due()
    assert breaks.due(), "still wanted until a break runs"
    breaks.run()
    assert not breaks.due()


@pytest.mark.parametrize(("share", "decode_after"), [(0.5, 3.0), (0.25, 9.0), (1.0, 0.0)])
def test_after_a_break_the_batch_decodes_for_its_share_of_the_time(
    share: float, decode_after: float
) -> None:
    breaks, work, clock = _breaks(share=share, run_seconds=3.0)
    clock.now += 60.0  # a minute of sampling alone builds up no credit for training
    work.messages = ["model-a"]
    assert breaks.due()
    breaks.run()  # takes 3 s
    assert breaks.breaks == 1
    work.messages = ["model-a"]
    if decode_after:
        clock.now += decode_after - 0.01
        assert not breaks.due()
    clock.now += 0.01
    assert breaks.due()


def test_a_join_is_due_for_a_sample_submission_while_rows_are_free() -> None:
    work, room, asked = _Work(), [0], []

    def join(n: int) -> int:
        asked.append(n)
        return n if len(asked) == 1 else 1  # all it may take, then fewer: none left

    def no_training() -> list[ClaimedRequest]:
        raise AssertionError("no model request was submitted")

    breaks = DecodeBreaks(
        work, no_training, lambda _: None, share=0.5, room=lambda: room[0], join=join
    )
    work.messages = [""]
    assert not breaks.due(), "no free row: nothing to join"
    room[0] = 2
    assert breaks.due()
    breaks.run()
    assert (asked, breaks.joined) == ([2], 2)
    assert breaks.due(), "it took all it could: more may wait"
    breaks.run()
    assert (asked, breaks.joined) == ([2, 2], 3)
    assert not breaks.due()


def test_share_zero_never_breaks_and_failures_surface_after_the_batch() -> None:
    off, work, _ = _breaks(share=0.0)
    work.messages = ["model-a"]
    assert not off.due()

    def boom() -> list[ClaimedRequest]:
        raise RuntimeError("database is gone")

    failing = DecodeBreaks(_Work(), boom, lambda _: None, share=0.5, training_wanted=True)
    failing.run()
    assert not failing.due(), "no break after a failed one"
    with pytest.raises(RuntimeError, match="database is gone"):
        failing.raise_failure()


def test_pinned_sampler_slots_are_never_evicted(tmp_path: Path) -> None:
    """While a sampling call reads a slot, a training run's allocation evicts another sampler
    or, with none left, fails; the pinned weights stay loaded."""
    from tx_engine.config import EngineConfig
    from tx_engine.engine import TrainingEngine
    from tx_engine.errors import NoFreeSlotError
    from tx_engine.testing import ensure_model

    engine = TrainingEngine(
        ensure_model("tiny-qwen3", tmp_path / "models"),
        EngineConfig(max_lora_adapters=2, max_lora_rank=4),
    )
    paths = []
    for seed in (1, 2):
        slot = engine.create_adapter(rank=4, seed=seed)
        engine.save_adapter(slot, tmp_path / f"sampler{seed}", include_optimizer=False)
        engine.free_adapter(slot)
        paths.append(str(tmp_path / f"sampler{seed}"))
    slots = SamplerSlots(lambda _base, make: make(engine))
    first = slots.slot("base", engine, paths[0])
    slots.slot("base", engine, paths[1])  # the engine is full now
    busy: set[int] = set()
    with slots.pinned(busy):
        busy.add(first)  # pinned as it is added (a request joining a running batch)
        assert slots.evict("base", engine)  # the unpinned one goes
        assert slots.held("base") == [paths[0]]
        assert not slots.evict("base", engine)
        engine.create_adapter(rank=4, seed=3)  # takes the freed slot
        with pytest.raises(NoFreeSlotError):
            engine.create_adapter(rank=4, seed=4)
    assert slots.slot("base", engine, paths[0]) == first  # still loaded
    assert slots.evict("base", engine), "unpinned after the block"
