"""Sample-time scores on tiny-qwen3 against an uncached forward pass (NumPy log-softmax).

``topk_sample_logprobs``, ``target_prompt_logprobs``, ``prompt_alt_tokens_k`` and
``prompt_logprobs_last_n`` (wire spec §4.3 / SampleResponse).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tx_engine.config import EngineConfig
from tx_engine.engine import TrainingEngine
from tx_engine.errors import InputError
from tx_engine.sampler import Sampler, SampleRequestArrays
from tx_engine.testing.adapters import stepped_adapter

CONFIG = EngineConfig(max_lora_adapters=1, max_lora_rank=8, batch_buckets=(4,))
PROMPT = np.array([11, 250, 37, 1999, 5, 88, 640, 12, 3, 901], np.int32)


@pytest.fixture(scope="module")
def engine(tiny_qwen3_dir: Path) -> TrainingEngine:
    eng = TrainingEngine(tiny_qwen3_dir, CONFIG)
    stepped_adapter(eng)
    return eng


@pytest.fixture(scope="module")
def sampler(engine: TrainingEngine) -> Sampler:
    return Sampler(engine, max_cache_tokens=1024, max_batch=8)


@partial(jax.jit, static_argnames=("graphdef",))
def _logits_jit(graphdef: Any, lora: Any, rest: Any, ids: Any, slots: Any) -> Any:
    model: Any = nnx.merge(graphdef, lora, rest)
    hidden = model(
        ids,
        positions_bt=jnp.arange(ids.shape[1])[None],
        attention_mask_bt=jnp.ones_like(ids),
        adapter_indices_b=slots,
    )
    return model.compute_logits(hidden, slots)[0]


def _log_probs(engine: TrainingEngine, slot: int, seq: np.ndarray, temp: float = 1.0) -> Any:
    """``log_softmax(logits / temp)`` ``[T, V]`` of the uncached forward of ``seq``."""
    ids = jnp.asarray(seq, jnp.int32)[None]
    e = engine
    logits = np.asarray(_logits_jit(e._graphdef, e._lora, e._rest, ids, jnp.array([slot])))
    z = logits.astype(np.float64) / temp
    z -= z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_topk_sample_logprobs_are_the_sampling_distributions_best(
    engine: TrainingEngine, sampler: Sampler, temperature: float
) -> None:
    req = SampleRequestArrays(
        PROMPT, 2, max_tokens=6, temperature=temperature, seed=3, stop=[], adapter=1,
        topk_sample_logprobs=3,
    )  # fmt: skip
    for seq in sampler.sample([req])[0].sequences:
        assert seq.topk_logprobs is not None
        assert len(seq.topk_logprobs) == len(seq.tokens)
        full = np.concatenate([PROMPT, seq.tokens])
        logp = _log_probs(engine, 1, full, temperature or 1.0)[len(PROMPT) - 1 : -1]
        for i, row in enumerate(seq.topk_logprobs):
            ids = [t for t, _ in row]
            assert ids == list(np.argsort(-logp[i], kind="stable")[:3])
            np.testing.assert_allclose([lp for _, lp in row], logp[i, ids], atol=1e-5)
            assert row[0][1] >= seq.logprobs[i] - 1e-6  # the best is at least the drawn one
        np.testing.assert_allclose(seq.logprobs, logp[np.arange(len(seq.tokens)), seq.tokens], atol=1e-5)  # fmt: skip
    plain = sampler.sample([SampleRequestArrays(PROMPT, max_tokens=2, seed=3)])[0]
    assert plain.sequences[0].topk_logprobs is None


def test_target_prompt_logprobs_score_the_given_ids(
    engine: TrainingEngine, sampler: Sampler
) -> None:
    rng = np.random.default_rng(0)
    targets = rng.integers(0, engine.vocab_size, (len(PROMPT) - 1, 3)).astype(np.int64)
    targets[:, 0] = PROMPT[1:]  # column 0 = the prompt itself → equals prompt_logprobs
    targets[2, 1:] = -1
    req = SampleRequestArrays(
        PROMPT, max_tokens=1, adapter=1, prompt_logprobs=True, target_prompt_logprobs=targets
    )
    other = SampleRequestArrays(PROMPT[:4], max_tokens=3, target_prompt_logprobs=targets[:3, :1])
    res, res_other = sampler.sample([req, other])
    got = res.target_prompt_logprobs
    assert got is not None
    assert got.dtype == np.float32
    assert got.shape == targets.shape
    logp = _log_probs(engine, 1, PROMPT)[:-1]
    want = np.take_along_axis(logp, np.maximum(targets, 0), axis=1)
    want[targets < 0] = 0.0
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got[:, 0], res.prompt_logprobs[1:], atol=1e-6)  # type: ignore[arg-type,index]
    base = _log_probs(engine, 0, PROMPT[:4])[:-1]
    assert res_other.target_prompt_logprobs is not None
    np.testing.assert_allclose(res_other.target_prompt_logprobs[:, 0], base[np.arange(3), targets[:3, 0]], atol=1e-5)  # fmt: skip
    assert res.prompt_alt_tokens is None
    assert res_other.prompt_logprobs is None


def test_prompt_alt_tokens_are_seeded_draws_scored_like_samples(
    engine: TrainingEngine, sampler: Sampler
) -> None:
    req = SampleRequestArrays(
        PROMPT, max_tokens=2, temperature=0.8, seed=5, adapter=1, prompt_alt_tokens_k=3
    )
    res = sampler.sample([req])[0]
    ids, lps = res.prompt_alt_tokens, res.prompt_alt_logprobs
    assert ids is not None
    assert lps is not None
    assert ids.shape == lps.shape == (len(PROMPT) - 1, 3)
    assert ids.dtype == np.int32
    assert lps.dtype == np.float32
    tempered = _log_probs(engine, 1, PROMPT, 0.8)[:-1]
    np.testing.assert_allclose(lps, np.take_along_axis(tempered, ids, axis=1), atol=1e-5)
    assert len(np.unique(ids)) > len(PROMPT)  # independent draws, not one token repeated
    # Same seed → same draws, whatever shares the batch; another seed → other draws.
    crowd = [SampleRequestArrays(PROMPT[:3], 2, max_tokens=4, seed=1, prompt_alt_tokens_k=1), req]
    np.testing.assert_array_equal(sampler.sample(crowd)[1].prompt_alt_tokens, ids)  # type: ignore[arg-type]
    other = sampler.sample([SampleRequestArrays(**{**req.__dict__, "seed": 6})])[0]
    assert not np.array_equal(other.prompt_alt_tokens, ids)
    # Greedy and top-k 1 draw the argmax every time.
    for kw in ({"temperature": 0.0}, {"top_k": 1}):
        greedy = sampler.sample([SampleRequestArrays(**{**req.__dict__, **kw})])[0]
        argmax = _log_probs(engine, 1, PROMPT)[:-1].argmax(-1)
        np.testing.assert_array_equal(greedy.prompt_alt_tokens, np.repeat(argmax[:, None], 3, 1))  # type: ignore[arg-type]


def test_prompt_logprobs_last_n_scores_only_the_tail(sampler: Sampler) -> None:
    scored = {"prompt_logprobs": True, "topk_prompt_logprobs": 2, "max_tokens": 1}
    full = sampler.sample([SampleRequestArrays(PROMPT, **scored)])[0]  # type: ignore[arg-type]
    for n in (1, 4, len(PROMPT) - 1, 50):
        res = sampler.sample([SampleRequestArrays(PROMPT, prompt_logprobs_last_n=n, **scored)])[0]  # type: ignore[arg-type]
        assert res.prompt_logprobs is not None
        assert res.topk_prompt_logprobs is not None
        first = max(1, len(PROMPT) - n)
        assert res.prompt_logprobs[:first] == [None] * first
        assert res.topk_prompt_logprobs[:first] == [None] * first
        assert res.prompt_logprobs[first:] == full.prompt_logprobs[first:]  # type: ignore[index]
        assert res.topk_prompt_logprobs[first:] == full.topk_prompt_logprobs[first:]  # type: ignore[index]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"topk_sample_logprobs": -1}, "topk_sample_logprobs"),
        ({"topk_sample_logprobs": 10**9}, "topk_sample_logprobs"),
        ({"prompt_alt_tokens_k": -2}, "prompt_alt_tokens_k"),
        ({"prompt_logprobs_last_n": 0}, "prompt_logprobs_last_n"),
        ({"target_prompt_logprobs": np.zeros((9,), np.int64)}, "target_prompt_logprobs"),
        ({"target_prompt_logprobs": np.zeros((8, 2), np.int64)}, "target_prompt_logprobs"),
        ({"target_prompt_logprobs": np.full((9, 2), -2, np.int64)}, "target_prompt_logprobs"),
        ({"target_prompt_logprobs": np.zeros((9, 2), np.float32)}, "target_prompt_logprobs"),
    ],
)
def test_bad_score_options_name_the_field(
    sampler: Sampler, kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(InputError, match=rf"requests\[0\]\.{field}"):
        sampler.sample([SampleRequestArrays(PROMPT, max_tokens=1, **kwargs)])
