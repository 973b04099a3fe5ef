"""Sampler on tiny-qwen3: logprobs equal the trainer's, batching is invisible, shapes are static.

All requests keep prompts ≤ 16 tokens and ``max_tokens`` ≤ 16, so most tests share the programs
for prompt bucket 16 and cache length 32; only the batch buckets vary.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tx_engine import step as programs
from tx_engine.config import EngineConfig
from tx_engine.engine import AdamParams, AdapterBatch, DatumArrays, TrainingEngine
from tx_engine.errors import AdapterError, InputError
from tx_engine.sampler import Sampler, SampleRequestArrays

CONFIG = EngineConfig(max_lora_adapters=2, max_lora_rank=8, batch_buckets=(4,))
PROMPT = np.array([11, 250, 37, 1999, 5, 88, 640, 12, 3, 901], np.int32)


def _train(engine: TrainingEngine, slot: int, seed: int) -> None:
    """Two AdamW steps so that the adapter's B factors are non-zero."""
    rng = np.random.default_rng(seed)
    seq = rng.integers(5, 2000, 12)
    datum = DatumArrays(seq[:-1].astype(np.int32), {"target_tokens": seq[1:].astype(np.int64)})
    for _ in range(2):
        engine.forward_backward([AdapterBatch(slot, [datum])])
        engine.optim_step(slot, AdamParams(learning_rate=1e-2))


@pytest.fixture(scope="module")
def engine(tiny_qwen3_dir: Path) -> TrainingEngine:
    eng = TrainingEngine(tiny_qwen3_dir, CONFIG)
    for seed in (1, 2):
        _train(eng, eng.create_adapter(rank=8, seed=seed), seed)
    return eng


@pytest.fixture(scope="module")
def sampler(engine: TrainingEngine) -> Sampler:
    return Sampler(engine, max_cache_tokens=1024, max_batch=8)


def _forward_logprobs(engine: TrainingEngine, slot: int | None, seq: np.ndarray) -> np.ndarray:
    """The trainer's logprob of ``seq[i+1]`` given ``seq[:i+1]``, for every i."""
    datum = DatumArrays(seq[:-1].astype(np.int32), {"target_tokens": seq[1:].astype(np.int64)})
    return engine.forward([AdapterBatch(slot, [datum])])[0].outputs[0].logprobs


@partial(jax.jit, static_argnames=("graphdef",))
def _full_logits_jit(graphdef: Any, lora: Any, rest: Any, ids: Any, slots: Any) -> Any:
    model: Any = nnx.merge(graphdef, lora, rest)
    hidden = model(
        ids,
        positions_bt=jnp.arange(ids.shape[1])[None],
        attention_mask_bt=jnp.ones_like(ids),
        adapter_indices_b=slots,
    )
    return model.compute_logits(hidden, slots)[0]


def _full_logits(engine: TrainingEngine, slot: int, seq: np.ndarray) -> np.ndarray:
    """Uncached ``[T, V]`` logits of the whole sequence (no KV cache involved)."""
    ids = jnp.asarray(seq, jnp.int32)[None]
    slots = jnp.array([slot], jnp.int32)
    return np.asarray(_full_logits_jit(engine._graphdef, engine._lora, engine._rest, ids, slots))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


# Most requests below have 2 samples, prompt ≤ 16 and max_tokens ≤ 16: one prefill program
# (P=1, T=16, B=2, S=32) and one decode program serve them.
SCORED = {"prompt_logprobs": True, "topk_prompt_logprobs": 3}


def test_sampled_and_prompt_logprobs_equal_trainer_forward(
    engine: TrainingEngine, sampler: Sampler
) -> None:
    slot = 1
    req = SampleRequestArrays(
        PROMPT, num_samples=2, max_tokens=8, seed=7, stop=[], adapter=slot, **SCORED
    )
    result = sampler.sample([req])[0]
    assert len(result.sequences) == 2
    assert not np.array_equal(result.sequences[0].tokens, result.sequences[1].tokens)
    n = len(PROMPT)
    for seq in result.sequences:
        assert seq.tokens.dtype == np.int32
        assert seq.logprobs.dtype == np.float32
        assert len(seq.tokens) == len(seq.logprobs) == 8
        assert seq.stop_reason == "length"
        ref = _forward_logprobs(engine, slot, np.concatenate([PROMPT, seq.tokens]))
        np.testing.assert_allclose(seq.logprobs, ref[n - 1 :], atol=1e-5, rtol=0)
    # The adapter matters: the base model scores the same tokens differently.
    base_ref = _forward_logprobs(engine, None, np.concatenate([PROMPT, seq.tokens]))
    assert np.abs(base_ref[n - 1 :] - seq.logprobs).max() > 1e-3
    assert result.prompt_logprobs is not None
    assert len(result.prompt_logprobs) == n
    assert result.prompt_logprobs[0] is None
    np.testing.assert_allclose(result.prompt_logprobs[1:], ref[: n - 1], atol=1e-5, rtol=0)
    # Top-k prompt rows: the k best tokens of the uncached forward, best first.
    rows = result.topk_prompt_logprobs
    assert rows is not None
    assert len(rows) == n
    assert rows[0] is None
    logp = _log_softmax(_full_logits(engine, slot, PROMPT)[:-1])
    for i, row in enumerate(rows[1:]):
        assert row is not None
        ids = [t for t, _ in row]
        assert ids == list(np.argsort(-logp[i], kind="stable")[:3])
        np.testing.assert_allclose([lp for _, lp in row], logp[i, ids], atol=1e-5)
        assert row[0][1] >= result.prompt_logprobs[i + 1]  # type: ignore[operator]


def test_greedy_equals_argmax_of_uncached_forward(engine: TrainingEngine, sampler: Sampler) -> None:
    for slot in (0, 2):
        req = SampleRequestArrays(
            PROMPT, num_samples=2, max_tokens=10, temperature=0.0, stop=[], adapter=slot
        )
        a, b = (s.tokens for s in sampler.sample([req])[0].sequences)
        np.testing.assert_array_equal(a, b)
        logits = _full_logits(engine, slot, np.concatenate([PROMPT, a]))
        np.testing.assert_array_equal(a, logits[len(PROMPT) - 1 : -1].argmax(-1))


def test_mixed_batch_rows_equal_rows_run_alone(sampler: Sampler) -> None:
    reqs = [
        SampleRequestArrays(PROMPT[:4], num_samples=2, max_tokens=5, seed=3, stop=[]),
        SampleRequestArrays(
            PROMPT,
            num_samples=2,
            max_tokens=9,
            temperature=0.8,
            top_k=50,
            seed=4,
            stop=[],
            adapter=1,
        ),
        SampleRequestArrays(
            PROMPT[2:],
            num_samples=2,
            max_tokens=3,
            temperature=1.3,
            top_p=0.9,
            seed=5,
            stop=[],
            adapter=2,
        ),
    ]
    together = sampler.sample(reqs)
    for req, res in zip(reqs, together, strict=True):
        alone = sampler.sample([req])[0]
        assert [len(s.tokens) for s in res.sequences] == [req.max_tokens] * req.num_samples
        for a, b in zip(res.sequences, alone.sequences, strict=True):
            np.testing.assert_array_equal(a.tokens, b.tokens)
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_same_seed_reproduces_and_other_seed_differs(sampler: Sampler) -> None:
    def run(seed: int) -> np.ndarray:
        req = SampleRequestArrays(PROMPT, 2, max_tokens=8, seed=seed, stop=[], adapter=1)
        return sampler.sample([req])[0].sequences[0].tokens

    np.testing.assert_array_equal(run(11), run(11))
    assert not np.array_equal(run(11), run(12))


def test_stop_token_is_included_and_reason_is_stop(engine: TrainingEngine) -> None:
    greedy = {"num_samples": 2, "max_tokens": 10, "temperature": 0.0, "adapter": 1}
    free = Sampler(engine, max_cache_tokens=1024, max_batch=8)
    tokens = free.sample([SampleRequestArrays(PROMPT, stop=[], **greedy)])[0].sequences[0].tokens
    stop_tok = int(tokens[3])
    first = int(np.flatnonzero(tokens == stop_tok)[0])
    seq = free.sample([SampleRequestArrays(PROMPT, stop=[stop_tok], **greedy)])[0].sequences[0]
    assert seq.stop_reason == "stop"
    np.testing.assert_array_equal(seq.tokens, tokens[: first + 1])
    assert len(seq.logprobs) == first + 1
    # Default stop (None) is EOS; with EOS set to that token the same cut happens.
    eos = Sampler(engine, max_cache_tokens=1024, max_batch=8, eos_token_ids=[stop_tok])
    seq = eos.sample([SampleRequestArrays(PROMPT, **greedy)])[0].sequences[0]
    assert seq.stop_reason == "stop"
    assert seq.tokens[-1] == stop_tok
    # A stop string through decode_fn.
    strs = Sampler(engine, max_cache_tokens=1024, max_batch=8, decode_fn=_angle_decode)
    req = SampleRequestArrays(PROMPT, stop=f"<{stop_tok}>", **greedy)
    seq = strs.sample([req])[0].sequences[0]
    assert seq.stop_reason == "stop"
    assert seq.tokens[-1] == stop_tok


def _angle_decode(ids: Any) -> str:
    return "".join(f"<{int(i)}>" for i in ids)


def test_default_eos_ids_come_from_model_files(sampler: Sampler, engine: TrainingEngine) -> None:
    eos = engine.model_config.hf_config["eos_token_id"]
    assert eos in sampler.eos_token_ids
    assert len(sampler.eos_token_ids) >= 1


def test_empty_stop_runs_to_max_tokens(sampler: Sampler) -> None:
    req = SampleRequestArrays(PROMPT, num_samples=2, max_tokens=16, seed=1, stop=[])
    for seq in sampler.sample([req])[0].sequences:
        assert seq.stop_reason == "length"
        assert len(seq.tokens) == 16


def test_max_tokens_none_fills_the_limit_and_too_long_is_refused(engine: TrainingEngine) -> None:
    small = Sampler(engine, max_cache_tokens=32, max_batch=8)
    seq = small.sample([SampleRequestArrays(PROMPT, stop=[], seed=0)])[0].sequences[0]
    assert len(seq.tokens) == 32 - len(PROMPT)
    assert seq.stop_reason == "length"
    with pytest.raises(InputError, match=r"requests\[1\].*max_tokens"):
        small.sample([SampleRequestArrays(PROMPT, max_tokens=2), SampleRequestArrays(PROMPT, max_tokens=23)])  # fmt: skip
    # A server's advertised context length below the cache budget is the limit instead.
    capped = Sampler(engine, max_cache_tokens=64, max_batch=8, max_sequence_tokens=24)
    seq = capped.sample([SampleRequestArrays(PROMPT, stop=[], seed=0)])[0].sequences[0]
    assert len(seq.tokens) == 24 - len(PROMPT)
    with pytest.raises(InputError, match="max_sequence_tokens"):
        capped.sample([SampleRequestArrays(np.arange(24, dtype=np.int32))])


def test_bad_requests_name_the_field(sampler: Sampler) -> None:
    cases = [
        (SampleRequestArrays(np.array([1, 99999])), "prompt_tokens"),
        (SampleRequestArrays(np.array([], np.int32)), "prompt_tokens"),
        (SampleRequestArrays(PROMPT, num_samples=0), "num_samples"),
        (SampleRequestArrays(PROMPT, max_tokens=0), "max_tokens"),
        (SampleRequestArrays(PROMPT, temperature=-1.0), "temperature"),
        (SampleRequestArrays(PROMPT, top_p=0.0), "top_p"),
        (SampleRequestArrays(PROMPT, stop="x"), "decode_fn"),
        (SampleRequestArrays(PROMPT, stop=5), "stop"),  # type: ignore[arg-type]
        (SampleRequestArrays(PROMPT, seed=2**127), "seed"),
    ]
    for req, field in cases:
        with pytest.raises(InputError, match=field):
            sampler.sample([req])
    # Checked before anything runs: the good request before it is never handed out.
    ready: list[int] = []
    with pytest.raises(InputError, match=r"requests\[1\]\.seed"):
        sampler.sample(
            [
                SampleRequestArrays(PROMPT, max_tokens=1),
                SampleRequestArrays(PROMPT, seed=-(2**128)),
            ],
            on_ready=lambda i, _result: ready.append(i),
        )
    assert ready == []
    with pytest.raises(AdapterError, match="adapter"):
        sampler.sample([SampleRequestArrays(PROMPT, adapter=3)])


def test_no_recompilation_inside_buckets(sampler: Sampler) -> None:
    def run(n: int, samples: int, max_tokens: int, **kw: Any) -> None:
        req = SampleRequestArrays(PROMPT[:n], samples, max_tokens=max_tokens, stop=[], **kw)
        sampler.sample([req])

    run(10, 3, 8, seed=1)  # warm-up: prefill P=1, T=16, B=4, S=32 and its decode step
    # Each LoRA rank bucket is its own prefill program: base prompts alone are bucket 0 (no
    # LoRA terms), these adapters bucket 8. Warm that one up too.
    run(10, 3, 8, seed=1, adapter=1)
    before = dict(programs.TRACE_COUNTS)
    run(7, 4, 5, seed=2, top_k=7, top_p=0.5, temperature=0.7, adapter=2)
    run(16, 3, 16, seed=3, temperature=0.0, adapter=1)
    run(3, 4, 2, seed=4, top_k=1)  # S = pow2(16 + 2 - 1) = 32 still
    assert dict(programs.TRACE_COUNTS) == before
    assert before["admit"] > 0
    assert before["decode_chunk"] > 0


def test_rows_over_the_cache_budget_wait_for_a_row(
    engine: TrainingEngine, sampler: Sampler
) -> None:
    # 64 cache tokens and S = 32 → 2 decode rows; samples 2 and 3 are admitted as rows free up.
    tight = Sampler(engine, max_cache_tokens=64, max_batch=8)
    req = SampleRequestArrays(PROMPT, num_samples=4, max_tokens=6, seed=9, stop=[], adapter=1,
                              **SCORED)  # fmt: skip
    got = tight.sample([req])[0]
    ref = sampler.sample([replace(req, num_samples=2)])[0]  # samples 0 and 1 alone
    for a, b in zip(got.sequences[:2], ref.sequences, strict=True):
        np.testing.assert_array_equal(a.tokens, b.tokens)
    assert len({tuple(s.tokens) for s in got.sequences}) == 4
    assert got.prompt_logprobs == ref.prompt_logprobs
    assert got.topk_prompt_logprobs == ref.topk_prompt_logprobs
