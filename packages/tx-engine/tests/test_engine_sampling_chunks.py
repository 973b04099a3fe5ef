"""Decode chunks: several decode steps per dispatch compute exactly what single steps do.

* :func:`step.decode_chunk` with ``n`` steps equals ``n`` calls of :func:`step.decode_step`
  (and of :func:`step.decode_step_topk`): tokens bit for bit, logprobs, top-k and the cache
  to float32 summation order; the steps it did not run are zeros; every step count shares one
  program;
* a :class:`Sampler` with 8 or 3 steps per dispatch returns what it returns with 1, for
  requests that stop on tokens mid-dispatch, wait for rows, sample several rows, use an adapter
  or ask for top-k sample logprobs;
* a dispatch runs one step where steps are long (the dispatch time cap);
* rows that end by length waste no steps: a dispatch ends where the row nearest its
  ``max_tokens`` does, so a waiting sample is admitted at the same step as with single steps.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tx_engine import step as programs
from tx_engine.config import EngineConfig
from tx_engine.engine import TrainingEngine
from tx_engine.sampler import Sampler, SampleRequestArrays, SampleResult
from tx_engine.sampling import RowSamplingParams, SamplingRow, continuous
from tx_engine.testing.adapters import stepped_adapter
from tx_engine.testing.caches import random_cache

PROMPT = np.array([11, 250, 37, 1999, 5, 88, 640, 12, 3, 901], np.int32)


@pytest.fixture(scope="module")
def engine(tiny_qwen3_dir: Path) -> TrainingEngine:
    """tiny-qwen3 with one adapter whose ``B`` factors are non-zero (one optimizer step)."""
    eng = TrainingEngine(tiny_qwen3_dir, EngineConfig(max_lora_adapters=1, max_lora_rank=8))
    stepped_adapter(eng)
    return eng


@pytest.mark.parametrize("k", [0, 4])
def test_a_chunk_of_n_steps_is_n_single_steps(engine: TrainingEngine, k: int) -> None:
    graph = engine.graphdef_for_slots({1}, keep_lora=True)
    lora, rest = engine.flat_model_state()
    rows = SamplingRow.for_request(num_samples=4, seed=3, temperature=0.8, top_k=50)
    params = jax.tree.map(jnp.asarray, RowSamplingParams.stack(rows))
    adapters = jnp.asarray([0, 1, 1, 0], jnp.int32)
    tokens = jnp.asarray([5, 6, 7, 8], jnp.int32)
    positions = jnp.asarray([9, 4, 9, 6], jnp.int32)
    step = jnp.asarray([1, 2, 3, 4], jnp.int32)
    n, chunk = 5, 8

    want, cache, last = [], random_cache(engine, 4, 32, 9), tokens
    for j in range(n):
        common = (graph, lora, rest, last, positions + j, adapters, params, step + j)
        if k:
            last, lps, cache, ids, top = programs.decode_step_topk(*common, cache, k=k)
            want.append((last, lps, ids, top))
        else:
            last, lps, cache = programs.decode_step(*common, cache)
            want.append((last, lps))
    got = programs.decode_chunk(
        graph, lora, rest, tokens, positions, adapters, params, step,
        random_cache(engine, 4, 32, 9), np.int32(n), chunk=chunk, k=k,
    )  # fmt: skip

    np.testing.assert_array_equal(got.tokens_nb[:n], np.stack([w[0] for w in want]))
    np.testing.assert_array_equal(got.last_b, last)
    np.testing.assert_allclose(got.logprobs_nb[:n], np.stack([w[1] for w in want]), atol=1e-6)
    np.testing.assert_array_equal(got.tokens_nb[n:], 0)  # steps not run
    for a, b in zip(jax.tree.leaves(got.cache), jax.tree.leaves(cache), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    assert int(got.cache.index) == 9 + n
    if k:
        assert got.topk_ids_nbk is not None
        assert got.topk_logprobs_nbk is not None
        np.testing.assert_array_equal(got.topk_ids_nbk[:n], np.stack([w[2] for w in want]))
        np.testing.assert_allclose(
            got.topk_logprobs_nbk[:n], np.stack([w[3] for w in want]), atol=1e-6
        )
    else:
        assert got.topk_ids_nbk is None
        assert got.topk_logprobs_nbk is None

    traces = dict(programs.TRACE_COUNTS)
    again = programs.decode_chunk(
        graph, lora, rest, tokens, positions, adapters, params, step,
        random_cache(engine, 4, 32, 9), np.int32(n - 2), chunk=chunk, k=k,
    )  # fmt: skip
    assert dict(programs.TRACE_COUNTS) == traces  # the step count is data: the same program
    np.testing.assert_array_equal(again.tokens_nb[: n - 2], got.tokens_nb[: n - 2])
    np.testing.assert_array_equal(again.tokens_nb[n - 2 :], 0)


def _requests(stop_token: int, max_new: int = 16) -> list[SampleRequestArrays]:
    return [
        SampleRequestArrays(PROMPT, max_tokens=12, seed=1, stop=[]),
        SampleRequestArrays(PROMPT[:5], 3, max_tokens=2, seed=2, stop=[], adapter=1),
        SampleRequestArrays(PROMPT[3:], max_tokens=max_new, seed=3, temperature=0.7, stop=[]),
        SampleRequestArrays(
            PROMPT, 2, max_tokens=14, temperature=0.0, stop=[stop_token], adapter=1
        ),
        SampleRequestArrays(
            PROMPT[1:], max_tokens=max_new, seed=5, top_k=20, stop=[], topk_sample_logprobs=3
        ),
        SampleRequestArrays(PROMPT[2:], 2, max_tokens=9, seed=6, stop=[stop_token]),
    ]


def _assert_same(got: list[SampleResult], want: list[SampleResult]) -> None:
    for res, ref in zip(got, want, strict=True):
        for a, b in zip(res.sequences, ref.sequences, strict=True):
            np.testing.assert_array_equal(a.tokens, b.tokens)
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
            assert a.stop_reason == b.stop_reason
            assert (a.topk_logprobs is None) == (b.topk_logprobs is None)
            if a.topk_logprobs is not None and b.topk_logprobs is not None:
                for x, y in zip(a.topk_logprobs, b.topk_logprobs, strict=True):
                    assert [t for t, _ in x] == [t for t, _ in y]
                    np.testing.assert_allclose([p for _, p in x], [p for _, p in y], atol=1e-5)


def test_chunked_sampling_returns_what_single_steps_return(engine: TrainingEngine) -> None:
    """A 128-slot budget gives 4 rows of a 32-slot cache, so most samples wait for a row."""
    single = Sampler(engine, max_cache_tokens=128, max_batch=4, decode_chunk=1)
    greedy = SampleRequestArrays(PROMPT, max_tokens=14, temperature=0.0, stop=[], adapter=1)
    stop = int(single.sample([greedy])[0].sequences[0].tokens[4])  # stops mid-dispatch
    want = single.sample(_requests(stop))
    assert any(s.stop_reason == "stop" for r in want for s in r.sequences)
    for chunk in (8, 3):
        sampler = Sampler(engine, max_cache_tokens=128, max_batch=4, decode_chunk=chunk)
        _assert_same(sampler.sample(_requests(stop)), want)
        assert sampler.decode_dispatches < sampler.decode_steps
        _assert_same(sampler.sample(_requests(stop, 7)), single.sample(_requests(stop, 7)))


def test_rows_that_end_by_length_free_at_the_same_step(engine: TrainingEngine) -> None:
    """Only ``stop=[]`` rows, more than the 4 rows: with 8 steps per dispatch, every waiting
    sample is admitted at the step it is with 1, so the run takes as many steps."""
    reqs = [
        SampleRequestArrays(PROMPT[i:], max_tokens=m, seed=i, stop=[])
        for i, m in enumerate([3, 16, 11, 5, 16, 2, 9, 13, 16])
    ]
    counts = {}
    for chunk in (1, 8):
        sampler = Sampler(
            engine, max_cache_tokens=128, max_batch=4, decode_chunk=chunk, compile_ahead=False
        )
        sampler.sample(reqs)  # compiled
        steps, dispatches = sampler.decode_steps, sampler.decode_dispatches
        sampler.sample(reqs)
        counts[chunk] = (sampler.decode_steps - steps, sampler.decode_dispatches - dispatches)
    assert counts[8][0] == counts[1][0]
    assert counts[8][1] < counts[1][1] / 2


def test_long_steps_run_one_per_dispatch(
    engine: TrainingEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every step longer than a dispatch may take, each dispatch runs one step (what
    waits for a dispatch boundary then waits one step), and the samples do not change."""
    reqs = [SampleRequestArrays(PROMPT[i:], max_tokens=12, seed=i, stop=[]) for i in range(3)]
    chunked = Sampler(engine, max_cache_tokens=128, max_batch=4, decode_chunk=8)
    want = chunked.sample(reqs)
    assert chunked.step_seconds is not None
    assert chunked.decode_dispatches < chunked.decode_steps
    monkeypatch.setattr(continuous, "DISPATCH_SECONDS", chunked.step_seconds / 100)
    steps, dispatches = chunked.decode_steps, chunked.decode_dispatches
    _assert_same(chunked.sample(reqs), want)
    assert chunked.decode_dispatches - dispatches == chunked.decode_steps - steps > 0
