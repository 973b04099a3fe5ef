"""Interruptions of a sampling call, between its decode steps.

Training: optimizer steps, adapter creation and freeing run on the engine mid-call, and neither
the samples nor the training change. Two engines built alike: one trains adapter 2 alone; the
other samples adapter 1 and the base model while the same training runs as interruptions.

Joins: requests added mid-call take free rows, rows the batch grows by (as far as the cache
budget allows), or rows as they free up (or a later run, when they do not fit the running
batch), and get the samples they get alone. Tests of when that happens (the schedule) turn
``compile_ahead`` off, so that no step waits for a program compiling in the background.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tx_engine import step as programs
from tx_engine.config import EngineConfig
from tx_engine.engine import AdamParams, AdapterBatch, DatumArrays, TrainingEngine
from tx_engine.errors import InputError
from tx_engine.sampler import Sampler, SampleRequestArrays, SampleResult

CONFIG = EngineConfig(max_lora_adapters=3, max_lora_rank=8, batch_buckets=(4,))
PROMPT = np.array([11, 250, 37, 1999, 5, 88, 640, 12, 3, 901], np.int32)
STEPS = 4


def _datum(seed: int) -> DatumArrays:
    seq = np.random.default_rng(seed).integers(5, 2000, 12)
    return DatumArrays(seq[:-1].astype(np.int32), {"target_tokens": seq[1:].astype(np.int64)})


def _engine(model_dir: Path) -> TrainingEngine:
    """Adapter 1 trained once (the one sampled), adapter 2 fresh (the one trained meanwhile)."""
    eng = TrainingEngine(model_dir, CONFIG)
    sampled = eng.create_adapter(rank=8, seed=1)
    eng.forward_backward([AdapterBatch(sampled, [_datum(1)])])
    eng.optim_step(sampled, AdamParams(learning_rate=1e-2))
    eng.create_adapter(rank=4, seed=2)
    return eng


def _train_step(eng: TrainingEngine, i: int) -> float:
    out = eng.forward_backward([AdapterBatch(2, [_datum(100 + i)])])
    eng.optim_step(2, AdamParams(learning_rate=1e-2, weight_decay=0.1))
    return float(out[0].metrics["loss:sum"])


class _TrainEveryThirdStep:
    """Due before every third decode step; each run is one training step of adapter 2, and the
    second run also creates and frees a third adapter (a slot load and reset mid-call)."""

    def __init__(self, eng: TrainingEngine) -> None:
        self.eng, self.asked, self.losses = eng, 0, []

    def due(self) -> bool:
        self.asked += 1
        return self.asked % 3 == 0 and len(self.losses) < STEPS

    def run(self) -> None:
        self.losses.append(_train_step(self.eng, len(self.losses)))
        if len(self.losses) == 2:
            self.eng.free_adapter(self.eng.create_adapter(rank=8, seed=3))


@pytest.fixture(scope="module")
def requests() -> list[SampleRequestArrays]:
    return [
        SampleRequestArrays(PROMPT, 2, max_tokens=24, seed=1, stop=[], adapter=1),
        SampleRequestArrays(PROMPT[:6], max_tokens=8, seed=2, temperature=0.7, stop=[]),
        SampleRequestArrays(PROMPT[2:], max_tokens=20, temperature=0.0, stop=[], adapter=1),
    ]


def test_training_between_decode_steps_changes_neither_samples_nor_steps(
    tiny_qwen3_dir: Path, requests: list[SampleRequestArrays]
) -> None:
    ref = _engine(tiny_qwen3_dir)
    expected = Sampler(ref, max_cache_tokens=256, max_batch=4).sample(requests)
    expected_losses = [_train_step(ref, i) for i in range(STEPS)]

    mixed = _engine(tiny_qwen3_dir)  # one step per dispatch: interruptions count steps
    sampler = Sampler(mixed, max_cache_tokens=256, max_batch=4, decode_chunk=1)
    training = _TrainEveryThirdStep(mixed)
    got = sampler.sample(requests, interruption=training)

    assert sampler.interruptions == STEPS, "every training step ran inside the sampling call"
    assert training.asked > 3 * STEPS, "decoding went on after the last interruption"
    for res, want in zip(got, expected, strict=True):
        for a, b in zip(res.sequences, want.sequences, strict=True):
            np.testing.assert_array_equal(a.tokens, b.tokens)
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(training.losses, expected_losses, rtol=1e-6)
    after, want_after = mixed.adapter_state(2), ref.adapter_state(2)
    assert after.step == want_after.step == STEPS
    assert after.moments is not None
    assert want_after.moments is not None
    for name, tree in (("factors", after.factors), ("moments", after.moments)):
        want = getattr(want_after, name)
        assert tree.keys() == want.keys()
        for key, value in want.items():
            np.testing.assert_allclose(tree[key], value, rtol=1e-6, atol=1e-7, err_msg=key)


def test_a_call_without_due_interruptions_never_runs_one(
    tiny_qwen3_dir: Path, requests: list[SampleRequestArrays]
) -> None:
    class Never:
        asked = 0

        def due(self) -> bool:
            self.asked += 1
            return False

        def run(self) -> None:
            raise AssertionError("not due, never run")

    eng = _engine(tiny_qwen3_dir)
    sampler = Sampler(eng, max_cache_tokens=256, max_batch=4)
    never = Never()
    sampler.sample(requests, interruption=never)
    # Asked before every dispatch but the first.
    assert never.asked >= sampler.decode_dispatches - 1 > 0
    assert sampler.interruptions == 0


class _JoinWhenThereIsRoom:
    """Joins ``later`` (and one bad request, refused) the first time the batch has room: a
    free row, or rows it may grow by."""

    def __init__(self, sampler: Sampler, later: list[SampleRequestArrays]) -> None:
        self.sampler, self.later, self.indices = sampler, later, []

    def due(self) -> bool:
        return not self.indices and self.sampler.free_rows > 0

    def run(self) -> None:
        with pytest.raises(InputError, match="max_tokens"):
            self.sampler.join(SampleRequestArrays(PROMPT, max_tokens=0))
        self.indices = [self.sampler.join(r) for r in self.later]


def test_requests_join_a_running_call_and_get_what_they_get_alone(tiny_qwen3_dir: Path) -> None:
    eng = _engine(tiny_qwen3_dir)
    # cache 64: 2 rows, up to 4; compile_ahead off: the test checks the schedule
    sampler = Sampler(eng, max_cache_tokens=256, max_batch=4, compile_ahead=False)
    first = [
        SampleRequestArrays(PROMPT, max_tokens=24, seed=1, stop=[], adapter=1),
        SampleRequestArrays(PROMPT[:4], max_tokens=3, seed=2, stop=[]),
    ]
    later = [
        SampleRequestArrays(PROMPT[2:], 2, max_tokens=6, seed=3, stop=[], adapter=1),
        SampleRequestArrays(PROMPT, max_tokens=100, seed=4, stop=[]),  # cache 128: a later run
    ]
    alone = [sampler.sample([r])[0] for r in first + later]
    with pytest.raises(RuntimeError, match="only valid"):
        sampler.join(later[0])

    joins = _JoinWhenThereIsRoom(sampler, later)
    handed: list[list[int]] = []
    got = sampler.sample(
        first, on_ready=lambda pairs: handed.append([i for i, _ in pairs]), interruption=joins
    )

    assert joins.indices == [2, 3]
    assert handed == [[1], [2], [0], [3]], "the joined request ended inside the running batch"
    assert len(got) == 4
    for res, want in zip(got, alone, strict=True):
        assert len(res.sequences) == len(want.sequences)
        for a, b in zip(res.sequences, want.sequences, strict=True):
            np.testing.assert_array_equal(a.tokens, b.tokens)
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


class _JoinAtOnce:
    """Joins ``later`` at the first decode step it is asked about, free rows or not."""

    def __init__(self, sampler: Sampler, later: list[SampleRequestArrays]) -> None:
        self.sampler, self.later = sampler, later
        self.indices: list[int] = []
        self.room = -1

    def due(self) -> bool:
        return not self.indices

    def run(self) -> None:
        self.room = self.sampler.free_rows
        self.indices = [self.sampler.join(r) for r in self.later]


@pytest.mark.parametrize(("budget", "room"), [(256, 3), (64, 0)])
def test_a_lone_request_batch_grows_for_a_joiner_when_the_cache_budget_allows(
    tiny_qwen3_dir: Path, budget: int, room: int
) -> None:
    """A long request alone decodes at batch 1. With room in the cache budget (4 rows of 64
    slots), a request that joins it starts at once (the batch grows to 4, rows and slots
    unchanged), ends first, and the batch shrinks back to the long row; without (one row), it
    waits for the long one to end. Either way both get what they get alone, and a second call
    compiles nothing new."""
    eng = _engine(tiny_qwen3_dir)
    sampler = Sampler(eng, max_cache_tokens=budget, max_batch=4, compile_ahead=False)
    long = SampleRequestArrays(PROMPT, max_tokens=40, seed=1, stop=[], adapter=1)  # 64 slots
    short = SampleRequestArrays(PROMPT[:6], 2, max_tokens=5, seed=3, stop=[])
    alone = [sampler.sample([r])[0] for r in (long, short)]

    def sample_with_a_joiner() -> tuple[list[SampleResult], list[list[int]], _JoinAtOnce]:
        joins, handed = _JoinAtOnce(sampler, [short]), []
        got = sampler.sample(
            [long],
            on_ready=lambda pairs: handed.append([i for i, _ in pairs]),
            interruption=joins,
        )
        return got, handed, joins

    before = sampler.resizes
    got, handed, joins = sample_with_a_joiner()
    assert joins.indices == [1]
    assert joins.room == room
    assert sampler.resizes - before == (2 if room else 0)
    assert handed == ([[1], [0]] if room else [[0], [1]])
    for res, want in zip(got, alone, strict=True):
        assert len(res.sequences) == len(want.sequences)
        for a, b in zip(res.sequences, want.sequences, strict=True):
            np.testing.assert_array_equal(a.tokens, b.tokens)
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)

    traces = dict(programs.TRACE_COUNTS)
    again, _, _ = sample_with_a_joiner()
    assert dict(programs.TRACE_COUNTS) == traces
    for a, b in zip(again[1].sequences, got[1].sequences, strict=True):
        np.testing.assert_array_equal(a.tokens, b.tokens)


def test_a_batch_shrinks_to_its_live_rows_once_nothing_waits(tiny_qwen3_dir: Path) -> None:
    """Four rows start together; three end 25 steps early and the batch shrinks to the
    long one (4 → 1 rows: decode computes every row, idle or not). The rows get what they get
    alone, and the prompt scores of a shrunk-away row are kept."""
    eng = _engine(tiny_qwen3_dir)
    sampler = Sampler(eng, max_cache_tokens=256, max_batch=4, compile_ahead=False)
    requests = [
        SampleRequestArrays(PROMPT, max_tokens=45, seed=1, stop=[], adapter=1),
        SampleRequestArrays(PROMPT[:5], 3, max_tokens=20, seed=2, stop=[], prompt_logprobs=True),
    ]  # both 64-slot caches: one run
    alone = [sampler.sample([r])[0] for r in requests]
    before = sampler.resizes
    got = sampler.sample(requests)
    assert sampler.resizes - before == 1
    for res, want in zip(got, alone, strict=True):
        for a, b in zip(res.sequences, want.sequences, strict=True):
            np.testing.assert_array_equal(a.tokens, b.tokens)
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    assert got[1].prompt_logprobs is not None
    assert alone[1].prompt_logprobs is not None
    np.testing.assert_allclose(
        np.asarray(got[1].prompt_logprobs[1:], np.float64),
        np.asarray(alone[1].prompt_logprobs[1:], np.float64),
        atol=1e-5,
        rtol=0,
    )
