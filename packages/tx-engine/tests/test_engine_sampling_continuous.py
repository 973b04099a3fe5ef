"""Continuous batching on tiny-qwen3: refilled rows finish sooner and change no row's output.

A 64-token cache budget with prompts ≤ 16 and ``max_tokens`` ≤ 16 (cache length 32) gives
2 decode rows, so most requests wait for a row and get admitted into a running cache. Tests of the schedule (decode steps, shifts) turn
``compile_ahead`` off: then no admission waits for its program to compile in the background.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tx_engine import step as programs
from tx_engine.config import EngineConfig
from tx_engine.engine import TrainingEngine
from tx_engine.errors import AdapterError
from tx_engine.sampler import Sampler, SampleRequestArrays, SampleResult
from tx_engine.step.ahead import PROGRAMS
from tx_engine.testing.adapters import stepped_adapter

CONFIG = EngineConfig(max_lora_adapters=1, max_lora_rank=8, batch_buckets=(4,))
PROMPT = np.array([11, 250, 37, 1999, 5, 88, 640, 12, 3, 901], np.int32)


@pytest.fixture(scope="module")
def engine(tiny_qwen3_dir: Path) -> TrainingEngine:
    eng = TrainingEngine(tiny_qwen3_dir, CONFIG)
    stepped_adapter(eng)
    return eng


@pytest.fixture(scope="module")
def alone(engine: TrainingEngine) -> Sampler:
    return Sampler(engine, max_cache_tokens=1024, max_batch=8)


def _requests(stop_token: int) -> list[SampleRequestArrays]:
    return [
        SampleRequestArrays(PROMPT, max_tokens=12, seed=1, stop=[]),
        SampleRequestArrays(PROMPT[:5], 3, max_tokens=2, seed=2, stop=[], adapter=1),
        SampleRequestArrays(PROMPT[3:], max_tokens=16, seed=3, temperature=0.7, stop=[]),
        SampleRequestArrays(
            PROMPT, 2, max_tokens=14, temperature=0.0, stop=[stop_token], adapter=1
        ),
        SampleRequestArrays(PROMPT[1:], max_tokens=16, seed=5, top_k=20, top_p=0.9, stop=[]),
    ]


def _stop_token(sampler: Sampler) -> int:
    """A token the greedy adapter-1 continuation of PROMPT emits early, to stop on."""
    req = SampleRequestArrays(PROMPT, max_tokens=14, temperature=0.0, stop=[], adapter=1)
    return int(sampler.sample([req])[0].sequences[0].tokens[2])


def _wave_steps(lengths: list[int], rows: int) -> int:
    """Decode steps of wave-by-wave batching: each wave of ``rows`` runs to its longest row."""
    waves = [lengths[i : i + rows] for i in range(0, len(lengths), rows)]
    return sum(max(w) - 1 for w in waves)


def test_refilled_rows_finish_sooner_and_equal_rows_alone(
    engine: TrainingEngine, alone: Sampler
) -> None:
    reqs = _requests(_stop_token(alone))
    tight = Sampler(engine, max_cache_tokens=64, max_batch=8, compile_ahead=False)
    together = tight.sample(reqs)
    lengths = []
    for req, res in zip(reqs, together, strict=True):
        ref = alone.sample([req])[0]
        assert len(res.sequences) == req.num_samples
        for a, b in zip(res.sequences, ref.sequences, strict=True):
            np.testing.assert_array_equal(a.tokens, b.tokens)
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
            assert a.stop_reason == b.stop_reason
            lengths.append(len(a.tokens))
    stopped = together[3].sequences[0]
    assert stopped.stop_reason == "stop"
    assert len(stopped.tokens) < 14
    # 2 rows (64 / 32): rows were refilled, and the cache had to move to make room.
    assert tight.decode_steps < _wave_steps(lengths, rows=2)
    assert tight.cache_shifts > 0


def test_no_recompilation_across_admissions_and_shifts(engine: TrainingEngine) -> None:
    tight = Sampler(engine, max_cache_tokens=64, max_batch=8, compile_ahead=False)
    reqs = _requests(stop_token=7)
    tight.sample(reqs)  # warm-up: every admission/shift/decode shape of this mix
    before = dict(programs.TRACE_COUNTS)
    shifts = tight.cache_shifts
    # New values for the stop=[] rows (the greedy stop row is kept), hence the same lengths and
    # admissions: nothing new to compile.
    other = [
        r if r.stop else replace(r, seed=(r.seed or 0) + 10, top_k=5, adapter=1 - (r.adapter or 0))
        for r in reqs
    ]
    tight.sample(other)
    assert tight.cache_shifts > shifts
    assert dict(programs.TRACE_COUNTS) == before


def test_base_prompts_alone_are_prefilled_without_lora_terms(
    engine: TrainingEngine, alone: Sampler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An admission of base-model prompts only runs the program without LoRA terms (rank
    bucket 0: a base prefill costs what the base model costs); one with an adapter prompt runs
    the run's bucket. Outputs equal those of the mixed admission (checked above)."""
    graphs = []
    real_call = PROGRAMS.call

    def recording_call(fn: Any, static: dict[str, Any], **args: Any) -> Any:
        if fn is programs.admit:
            graphs.append(static["graphdef"])
        return real_call(fn, static, **args)

    monkeypatch.setattr(PROGRAMS, "call", recording_call)
    base = SampleRequestArrays(PROMPT, max_tokens=3, seed=1, stop=[], prompt_logprobs=True)
    alone.sample([base])
    assert graphs == [engine.graphdef_for_slots([0])]
    graphs.clear()
    alone.sample([base, replace(base, adapter=1)])
    assert graphs == [engine.graphdef_for_slots([0, 1])]
    assert graphs[0] is not engine.graphdef_for_slots([0])


def test_single_row_budget_serves_requests_one_after_another(
    engine: TrainingEngine, alone: Sampler
) -> None:
    # 32 tokens: one row of S=32; every sample waits for the previous one to finish.
    one = Sampler(engine, max_cache_tokens=32, max_batch=8)
    req = SampleRequestArrays(PROMPT, 3, max_tokens=6, seed=9, stop=[], prompt_logprobs=True)
    got, ref = one.sample([req])[0], alone.sample([req])[0]
    for a, b in zip(got.sequences, ref.sequences, strict=True):
        np.testing.assert_array_equal(a.tokens, b.tokens)
    assert got.prompt_logprobs is not None
    assert ref.prompt_logprobs is not None
    np.testing.assert_allclose(got.prompt_logprobs[1:], ref.prompt_logprobs[1:], atol=1e-6)  # type: ignore[arg-type]


def test_requests_with_one_prompt_share_a_prefill(engine: TrainingEngine, alone: Sampler) -> None:
    # An RL group as the cookbook sends it: one request per rollout, same prompt and adapter.
    group = [
        SampleRequestArrays(PROMPT, max_tokens=4 + s, seed=s, stop=[], adapter=1) for s in range(4)
    ]
    base = SampleRequestArrays(PROMPT, max_tokens=5, seed=7, stop=[])  # other weights
    scored = SampleRequestArrays(  # owes prompt scores: keeps its own prefill row
        PROMPT, max_tokens=5, seed=8, stop=[], adapter=1, prompt_logprobs=True
    )
    shared = Sampler(engine, max_cache_tokens=1024, max_batch=8)
    got = shared.sample([*group, base, scored])
    assert shared.prefilled_prompts == 3
    for req, res in zip([*group, base, scored], got, strict=True):
        ref = alone.sample([req])[0]
        (a,), (b,) = res.sequences, ref.sequences
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    assert got[-1].prompt_logprobs is not None
    np.testing.assert_allclose(
        got[-1].prompt_logprobs[1:],  # type: ignore[arg-type]
        alone.sample([scored])[0].prompt_logprobs[1:],  # type: ignore[index]
        atol=1e-6,
    )


def test_each_request_is_handed_out_when_its_own_rows_end(alone: Sampler) -> None:
    requests = [
        SampleRequestArrays(PROMPT, max_tokens=16, seed=1, stop=[]),
        SampleRequestArrays(PROMPT[:5], 3, max_tokens=2, seed=2, stop=[], prompt_logprobs=True),
        SampleRequestArrays(PROMPT, max_tokens=6, seed=3, stop=[], adapter=1),
        # a longer cache bucket: a second run, after the first one's requests were handed out
        SampleRequestArrays(np.tile(PROMPT, 4), max_tokens=3, seed=4, stop=[]),
    ]
    calls: list[list[int]] = []
    handed: dict[int, SampleResult] = {}

    def on_ready(pairs: list[tuple[int, SampleResult]]) -> None:
        calls.append([i for i, _ in pairs])
        for i, result in pairs:
            assert i not in handed, f"request {i} handed out twice"
            handed[i] = result

    got = alone.sample(requests, on_ready=on_ready)
    assert calls == [[1], [2], [0], [3]]  # in the order they end, not the order given
    assert all(handed[i] is result for i, result in enumerate(got))
    assert len(got[1].sequences) == 3
    assert got[1].prompt_logprobs is not None
    for req, res in zip(requests, got, strict=True):  # as if sampled alone
        np.testing.assert_array_equal(
            res.sequences[0].tokens, alone.sample([req])[0].sequences[0].tokens
        )


def test_a_bad_request_is_refused_before_any_result_is_handed_out(alone: Sampler) -> None:
    good = SampleRequestArrays(PROMPT, max_tokens=2, seed=1, stop=[])
    bad = SampleRequestArrays(PROMPT, max_tokens=2, seed=1, stop=[], adapter=99)
    handed: list[tuple[int, SampleResult]] = []
    with pytest.raises(AdapterError, match=r"requests\[1\]\.adapter"):
        alone.sample([good, bad], on_ready=handed.extend)
    assert handed == []
