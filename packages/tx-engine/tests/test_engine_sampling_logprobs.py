"""The documented logprob: ``log_softmax(logits / T)[token]``, untruncated, T=1 for greedy.

At T=1 it must equal the trainer's logprob of the same token (Tinker RL code uses the sampler's
logprobs as the behaviour policy in importance ratios), so that case is checked against
`tx_engine.losses.target_logprobs_from_logits`, the function the forward pass uses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tx_engine.losses import target_logprobs_from_logits
from tx_engine.sampling import (
    RowSamplingParams,
    SamplingRow,
    decode_keys,
    sample_tokens,
    token_logprobs,
    topk_logprobs,
)

VOCAB = 20
BATCH = 8


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@jax.jit
def _step(logits_bv: jax.Array, params: RowSamplingParams, step: jax.Array) -> tuple:
    return sample_tokens(logits_bv, params, decode_keys(params.key_data, step))


def _sample(rows: list[SamplingRow], seed: int = 0, steps: int = 4) -> tuple:
    """Logits ``[steps, B, V]`` and the tokens and logprobs drawn from them.

    Rows are padded to `BATCH` so the module compiles the step once.
    """
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(steps, BATCH, VOCAB)) * 2.0).astype(np.float32)
    params = RowSamplingParams.stack(rows, pad_to=BATCH)
    outs = [_step(logits[t], params, jnp.full(BATCH, t)) for t in range(steps)]
    tokens = np.stack([np.asarray(o[0]) for o in outs])
    logprobs = np.stack([np.asarray(o[1]) for o in outs])
    n = len(rows)
    return logits[:, :n], tokens[:, :n], logprobs[:, :n]


def _gather(table: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """``table[..., token]`` for tokens of shape ``table.shape[:-1]`` or with a trailing k."""
    if tokens.ndim == table.ndim:
        return np.take_along_axis(table, tokens, axis=-1)
    return np.take_along_axis(table, tokens[..., None], axis=-1)[..., 0]


def test_temperature_one_logprobs_equal_the_trainers() -> None:
    rows = [SamplingRow(1.0, seed=s, sample_index=s) for s in range(8)]
    logits, tokens, logprobs = _sample(rows)
    # The trainer sees one sequence per row: [B, T, V] with T the decode steps.
    trainer = target_logprobs_from_logits(
        jnp.asarray(logits.transpose(1, 0, 2)), jnp.asarray(tokens.T)
    )
    np.testing.assert_allclose(logprobs, np.asarray(trainer).T, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(logprobs, _gather(_log_softmax(logits), tokens), atol=1e-5)


def test_tempered_rows_report_the_tempered_distribution() -> None:
    temps = np.array([0.5, 0.5, 1.5, 1.5, 0.7, 3.0], np.float32)
    rows = [SamplingRow(float(t), seed=i) for i, t in enumerate(temps)]
    logits, tokens, logprobs = _sample(rows, seed=1)
    tempered = _gather(_log_softmax(logits / temps[None, :, None]), tokens)
    np.testing.assert_allclose(logprobs, tempered, atol=1e-5)
    untempered = _gather(_log_softmax(logits), tokens)
    assert np.abs(logprobs - untempered).max() > 0.1  # T really enters the definition


def test_greedy_rows_report_the_temperature_one_logprob_of_the_argmax() -> None:
    rows = [SamplingRow(0.0, top_k=3, top_p=0.5, seed=i) for i in range(4)]
    logits, tokens, logprobs = _sample(rows, seed=2)
    np.testing.assert_array_equal(tokens, logits.argmax(-1))
    np.testing.assert_allclose(logprobs, _log_softmax(logits).max(-1), atol=1e-5)


def test_truncation_is_not_renormalised_into_the_logprob() -> None:
    rows = [SamplingRow(0.8, top_k=2, seed=i) for i in range(4)]
    rows += [SamplingRow(1.0, top_p=0.3, seed=i) for i in range(4)]
    logits, tokens, logprobs = _sample(rows, seed=3)
    temps = np.array([0.8] * 4 + [1.0] * 4, np.float32)[None, :, None]
    full = _log_softmax(logits / temps)
    np.testing.assert_allclose(logprobs, _gather(full, tokens), atol=1e-5)
    # Renormalised over the top 2 the logprob would be larger (closer to 0) than this.
    top2 = np.sort(full[:, :4], axis=-1)[..., -2:]
    renorm = _gather(full[:, :4], tokens[:, :4]) - np.log(np.exp(top2).sum(-1))
    assert np.all(renorm > logprobs[:, :4] + 1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_token_logprobs_match_numpy_for_any_leading_shape(dtype: jnp.dtype) -> None:
    rng = np.random.default_rng(4)
    logits = jnp.asarray(rng.normal(size=(3, 5, VOCAB)) * 3, dtype)
    tokens = rng.integers(0, VOCAB, size=(3, 5))
    reference = np.asarray(logits, np.float32)
    got = token_logprobs(logits, jnp.asarray(tokens))
    np.testing.assert_allclose(got, _gather(_log_softmax(reference), tokens), atol=1e-5)
    temps = np.array([0.5, 1.0, 2.0], np.float32)
    got_t = token_logprobs(logits, jnp.asarray(tokens), jnp.asarray(temps))
    want_t = _gather(_log_softmax(reference / temps[:, None, None]), tokens)
    np.testing.assert_allclose(got_t, want_t, atol=1e-5)
    got_bv = token_logprobs(logits[:, 0], jnp.asarray(tokens[:, 0]), 0.0)  # T<=0 scored at 1
    np.testing.assert_allclose(got_bv, _gather(_log_softmax(reference), tokens)[:, 0], atol=1e-5)


def test_topk_logprobs_are_sorted_and_exact() -> None:
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(2, 6, VOCAB)).astype(np.float32) * 3
    ids, logprobs = topk_logprobs(jnp.asarray(logits), 4)
    assert ids.shape == (2, 6, 4)
    assert ids.dtype == jnp.int32
    np.testing.assert_array_equal(ids, np.argsort(-logits, axis=-1)[..., :4])
    np.testing.assert_allclose(logprobs, _gather(_log_softmax(logits), np.asarray(ids)), atol=1e-5)
    assert np.all(np.diff(np.asarray(logprobs), axis=-1) <= 0)
    # Per-row temperature changes the values, not the order.
    ids_t, logprobs_t = topk_logprobs(jnp.asarray(logits), 4, jnp.asarray([0.5, 2.0]))
    np.testing.assert_array_equal(ids_t, ids)
    want = _gather(_log_softmax(logits / np.array([0.5, 2.0])[:, None, None]), np.asarray(ids))
    np.testing.assert_allclose(logprobs_t, want, atol=1e-5)
    with pytest.raises(ValueError, match="k"):
        topk_logprobs(jnp.asarray(logits), VOCAB + 1)
