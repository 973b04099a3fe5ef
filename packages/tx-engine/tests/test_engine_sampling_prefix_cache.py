"""Prefix cache: a prompt that extends an earlier sample's sequence prefills only what is new.

Each test runs conversations turn by turn: turn ``k+1``'s prompt is turn ``k``'s prompt, its
sampled tokens and a few new tokens. A sampler with the cache must give the tokens and logprobs
of a sampler without it (one engine, so the same weights), while reusing keys/values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tx_engine import step as programs
from tx_engine.config import EngineConfig
from tx_engine.engine import AdamParams, AdapterBatch, DatumArrays, TrainingEngine
from tx_engine.sampler import Sampler, SampleRequestArrays, SampleResult
from tx_engine.sampling.buckets import context_bucket

CONFIG = EngineConfig(max_lora_adapters=2, max_lora_rank=8)
MAX_TOKENS = 24


def _step(eng: TrainingEngine, slot: int, seed: int) -> None:
    seq = np.random.default_rng(seed).integers(5, 2000, 30)
    datum = DatumArrays(seq[:-1].astype(np.int32), {"target_tokens": seq[1:].astype(np.int64)})
    eng.forward_backward([AdapterBatch(slot, [datum])])
    eng.optim_step(slot, AdamParams(learning_rate=1e-2))


@pytest.fixture(scope="module")
def engine(tiny_qwen3_dir: Path) -> TrainingEngine:
    eng = TrainingEngine(tiny_qwen3_dir, CONFIG)
    _step(eng, eng.create_adapter(rank=8, seed=1), seed=0)
    return eng


def _openings(n: int, length: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(5, 2000, length).astype(np.int32) for _ in range(n)]


def _next_prompts(prompts: list[np.ndarray], results: list[SampleResult], turn: int) -> list[np.ndarray]:  # fmt: skip
    """Each conversation's next prompt: its prompt, its first sample's tokens, 5 new tokens."""
    rng = np.random.default_rng(100 + turn)
    return [
        np.concatenate([p, r.sequences[0].tokens, rng.integers(5, 2000, 5).astype(np.int32)])
        for p, r in zip(prompts, results, strict=True)
    ]


def _requests(prompts: list[np.ndarray], adapter: int | None, turn: int, **kw: object) -> list[SampleRequestArrays]:  # fmt: skip
    return [
        SampleRequestArrays(p, max_tokens=MAX_TOKENS, seed=10 * turn + i, stop=[], adapter=adapter, **kw)  # type: ignore[arg-type]
        for i, p in enumerate(prompts)
    ]  # fmt: skip


def _assert_same(got: list[SampleResult], want: list[SampleResult]) -> None:
    for g, w in zip(got, want, strict=True):
        for gs, ws in zip(g.sequences, w.sequences, strict=True):
            np.testing.assert_array_equal(gs.tokens, ws.tokens)
            np.testing.assert_allclose(gs.logprobs, ws.logprobs, atol=1e-5, rtol=0)
        if w.prompt_logprobs is not None:
            assert g.prompt_logprobs is not None
            assert g.prompt_logprobs[0] is None
            np.testing.assert_allclose(
                np.array(g.prompt_logprobs[1:]), np.array(w.prompt_logprobs[1:]), atol=1e-5
            )


@pytest.mark.parametrize("adapter", [None, 1], ids=["base", "adapter"])
def test_later_turns_reuse_the_conversation_and_sample_as_without_the_cache(
    engine: TrainingEngine, adapter: int | None
) -> None:
    cached = Sampler(engine, prefix_cache_tokens=4096)
    plain = Sampler(engine)
    prompts = _openings(3)
    cache = cached.prefix_cache
    assert cache is not None
    for turn in range(3):
        requests = _requests(prompts, adapter, turn)
        if turn == 2:  # plus one asking for prompt logprobs: its prompt is prefilled whole
            requests.append(_requests(prompts[:1], adapter, 9, prompt_logprobs=True)[0])
        hits, reused = cache.hits, cache.reused_tokens
        got = cached.sample(requests)
        _assert_same(got, plain.sample(requests))
        if turn:  # every conversation continues its own kept sequence
            assert cache.hits - hits == len(prompts)
            kept = len(prompts[0]) - 5 - 1  # the last turn's prompt + all its tokens but one
            assert cache.reused_tokens - reused == len(prompts) * context_bucket(kept)
        prompts = _next_prompts(prompts, got[: len(prompts)], turn)
    assert len(cache) == len(prompts) + 1  # one entry per conversation: later turns replace


@pytest.mark.parametrize("adapter", [None, 1], ids=["base", "adapter"])
def test_prompts_sharing_a_system_prompt_prefill_it_once(
    engine: TrainingEngine, adapter: int | None
) -> None:
    """Requests arriving together whose prompts share a 48-token prefix (two system prompts,
    interleaved): the first of each is prefilled whole and kept at admission; the others wait
    one step and reuse its prefix."""
    cached, plain = Sampler(engine, prefix_cache_tokens=4096), Sampler(engine)
    cache = cached.prefix_cache
    assert cache is not None
    rng = np.random.default_rng(3)
    systems = [rng.integers(5, 2000, 48).astype(np.int32) for _ in range(2)]
    questions = [rng.integers(5, 2000, 8).astype(np.int32) for _ in range(6)]
    prompts = [np.concatenate([systems[i % 2], q]) for i, q in enumerate(questions)]
    assert all(p[48] != q[48] for p in prompts for q in prompts if p is not q)
    requests = _requests(prompts, adapter, 0)
    _assert_same(cached.sample(requests), plain.sample(requests))
    assert (cache.hits, cache.reused_tokens) == (4, 4 * 48)


def test_mixed_random_rounds_sample_as_without_the_cache(engine: TrainingEngine) -> None:
    """Seeded rounds that mix what the cache must get right together: shared system prompts,
    continued conversations, equal prompts, ``num_samples``, base and adapter rows, prompt
    logprobs, EOS stops, and 4 decode rows (queueing, refills) over a pool small enough that
    entries are evicted and one copy's entries compete for room."""
    rng = np.random.default_rng(11)
    cached = Sampler(engine, prefix_cache_tokens=320, max_batch=4)
    plain = Sampler(engine, max_batch=4)
    cache = cached.prefix_cache
    assert cache is not None

    def tokens(n: int) -> np.ndarray:
        return rng.integers(5, 2000, n).astype(np.int32)

    systems = [tokens(40) for _ in range(2)]
    finished: list[tuple[np.ndarray, int | None]] = []  # (prompt + sample, adapter) so far
    for round_ in range(3):
        requests: list[SampleRequestArrays] = []
        for i in range(6):
            adapter = [None, 1][int(rng.integers(2))]
            kind = int(rng.integers(4)) if finished else 0
            if kind == 0:  # a shared system prompt and a question
                prompt = np.concatenate([systems[int(rng.integers(2))], tokens(int(rng.integers(4, 12)))])  # fmt: skip
            elif kind == 1:  # the next turn of an earlier conversation, on its adapter
                prompt, adapter = finished[int(rng.integers(len(finished)))]
                prompt = np.concatenate([prompt, tokens(3)])
            elif kind == 2 and requests:  # the same prompt as the request before
                prompt, adapter = requests[-1].prompt_tokens, requests[-1].adapter
            else:
                prompt = tokens(int(rng.integers(17, 40)))
            requests.append(
                SampleRequestArrays(
                    prompt, num_samples=int(rng.integers(1, 3)), max_tokens=int(rng.integers(3, 9)),
                    seed=100 * round_ + i, stop=None if rng.integers(2) else [], adapter=adapter,
                    prompt_logprobs=bool(rng.integers(5) == 0),
                )
            )  # fmt: skip
        got = cached.sample(requests)
        _assert_same(got, plain.sample(requests))
        for request, result in zip(requests, got, strict=True):
            if len(request.prompt_tokens) < 52:  # keep prompts in the 64 bucket or below
                sample = result.sequences[0].tokens
                finished.append((np.concatenate([request.prompt_tokens, sample]), request.adapter))
    assert cache.hits >= 4  # the rounds exercise reuse (8 with this seed)
    assert cache.used_tokens <= 320


def test_a_slot_whose_weights_changed_is_not_reused(engine: TrainingEngine) -> None:
    cached, plain = Sampler(engine, prefix_cache_tokens=4096), Sampler(engine)
    cache = cached.prefix_cache
    assert cache is not None
    prompts = _openings(2)
    requests = _requests(prompts[:1], 1, 0) + _requests(prompts[1:], None, 0)
    first = cached.sample(requests)
    _step(engine, 1, seed=1)  # the adapter's weights change; the base model's do not
    follow = _next_prompts(prompts, first, 0)
    requests = _requests(follow[:1], 1, 1) + _requests(follow[1:], None, 1)
    hits = cache.hits
    _assert_same(cached.sample(requests), plain.sample(requests))
    assert cache.hits - hits == 1  # the base conversation only


def test_reuse_compiles_nothing_after_its_first_call(engine: TrainingEngine) -> None:
    cached = Sampler(engine, prefix_cache_tokens=4096)
    for round_ in range(2):
        prompts = _openings(2, length=40 - round_)  # other tokens, same buckets
        first = cached.sample(_requests(prompts, None, 0))
        before = dict(programs.TRACE_COUNTS)
        cached.sample(_requests(_next_prompts(prompts, first, 0), None, 1))
        if round_:
            assert dict(programs.TRACE_COUNTS) == before


def test_least_recently_used_sequences_make_room(engine: TrainingEngine) -> None:
    # Each first turn keeps 40 + 23 = 63 tokens: the 100-token pool holds one at a time.
    cached, plain = Sampler(engine, prefix_cache_tokens=100), Sampler(engine)
    cache = cached.prefix_cache
    assert cache is not None
    a, b = _openings(2)
    first_a = cached.sample(_requests([a], None, 0))
    first_b = cached.sample(_requests([b], None, 0))
    assert len(cache) == 1
    assert cache.used_tokens == 63
    hits = cache.hits
    follow = _next_prompts([a, b], first_a + first_b, 0)
    for prompt, reused in ((follow[1], 1), (follow[0], 0)):
        request = _requests([prompt], None, 1)
        _assert_same(cached.sample(request), plain.sample(request))
        assert cache.hits - hits == reused  # a's entry was dropped to make room for b's
        hits = cache.hits


def test_one_copy_does_not_make_room_with_its_own_entries(engine: TrainingEngine) -> None:
    # Two conversations end in the same fetch: their 63-token sequences go in one copy, and
    # the 100-token pool holds one. The first is kept; the second is skipped rather than
    # taking the slots the same copy writes the first one to.
    cached, plain = Sampler(engine, prefix_cache_tokens=100), Sampler(engine)
    cache = cached.prefix_cache
    assert cache is not None
    openings = _openings(2)
    first = cached.sample(_requests(openings, None, 0))
    assert (len(cache), cache.used_tokens) == (1, 63)
    follow = _next_prompts(openings, first, 0)
    for prompt, reused in ((follow[0], 1), (follow[1], 0)):
        hits = cache.hits
        request = _requests([prompt], None, 1)
        _assert_same(cached.sample(request), plain.sample(request))
        assert cache.hits - hits == reused


def test_context_buckets_keep_two_sizes_per_octave() -> None:
    assert [context_bucket(n) for n in (16, 23, 24, 31, 32, 47, 48, 95, 96, 500)] == [
        16, 16, 24, 24, 32, 32, 48, 64, 96, 384,
    ]  # fmt: skip
