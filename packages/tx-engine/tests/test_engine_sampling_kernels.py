"""Token selection: greedy, per-row top-k / top-p sets, and sampled frequencies vs softmax.

Frequencies are checked with a Pearson chi-square statistic against the 0.999 quantile of the
chi-square distribution (a true sampler fails one such test in a thousand), with a negative
control showing the test rejects a wrong distribution.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tx_engine.sampling import RowSamplingParams, SamplingRow, decode_keys, sample_tokens

# chi2.ppf(0.999, dof) by degrees of freedom (standard table values).
CHI2_CRIT_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458}
CHI2_CRIT_999 |= {7: 24.322, 8: 26.124, 9: 27.877, 10: 29.588, 11: 31.264}

LOGITS_12 = np.array(
    [1.2, -0.3, 0.8, 2.0, -1.0, 0.1, 1.5, -0.6, 0.4, -2.0, 0.9, -0.1], dtype=np.float32
)


BATCH = 20_000  # every call is padded to this one shape, so the module compiles once


@functools.cache
def _jitted_step():
    def step(logits_bv: jax.Array, params: RowSamplingParams, step_b: jax.Array):
        return sample_tokens(logits_bv, params, decode_keys(params.key_data, step_b))

    return jax.jit(step)


def _run(logits_bv: np.ndarray, rows: list[SamplingRow], step: int = 0) -> np.ndarray:
    """Tokens for ``rows`` (logits one row each, or one row for all), padded to `BATCH`."""
    params = RowSamplingParams.stack(rows, pad_to=BATCH)
    logits = np.zeros((BATCH, logits_bv.shape[-1]), np.float32)
    logits[: len(rows)] = logits_bv
    tokens, _ = _jitted_step()(jnp.asarray(logits), params, jnp.full(BATCH, step, jnp.int32))
    return np.asarray(tokens)[: len(rows)]


def _draw(logits_v: np.ndarray, row: SamplingRow, draws: int = BATCH) -> np.ndarray:
    """``draws`` tokens from one row's settings: one key per draw via distinct sample indices."""
    rows = [
        SamplingRow(row.temperature, row.top_k, row.top_p, row.seed, index)
        for index in range(draws)
    ]
    return _run(logits_v, rows)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()


def _chi2(tokens: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson statistic and its dof; the rarest cells are pooled until each expects >= 5."""
    assert np.all(probs[tokens] > 0), "a token with zero expected probability was drawn"
    counts = np.bincount(tokens, minlength=probs.shape[0]).astype(np.float64)
    expected = probs * tokens.shape[0]
    support = np.flatnonzero(probs > 0)
    order = support[np.argsort(expected[support])]
    pooled = int(np.searchsorted(np.cumsum(expected[order]), 5.0)) + 1
    obs = np.append(counts[order[pooled:]], counts[order[:pooled]].sum())
    exp = np.append(expected[order[pooled:]], expected[order[:pooled]].sum())
    assert exp.min() >= 5, "test design: too few draws for a chi-square test"
    return float(((obs - exp) ** 2 / exp).sum()), exp.shape[0] - 1


def test_greedy_is_argmax_whatever_the_filters_and_keys() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(16, 12)).astype(np.float32) * 3
    rows = [
        SamplingRow(0.0, top_k=k, top_p=p, seed=s)
        for k, p, s in zip([-1, 1, 3, 40] * 4, [1.0, 0.5, 0.9, 0.1] * 4, range(16), strict=True)
    ]
    for step in range(3):
        np.testing.assert_array_equal(_run(logits, rows, step), logits.argmax(-1))


def test_top_k_per_row_never_leaves_its_top_k() -> None:
    vocab, per_row = LOGITS_12.shape[0], 500
    ks = [1, 2, 3, 5, -1, vocab, vocab + 7]
    rows = [SamplingRow(1.0, k, 1.0, seed=3, sample_index=i) for k in ks for i in range(per_row)]
    tokens = _run(LOGITS_12, rows).reshape(len(ks), per_row)
    order = np.argsort(-LOGITS_12)
    for k, row_tokens in zip(ks, tokens, strict=True):
        allowed = set(order[: k if 0 < k < vocab else vocab].tolist())
        seen = set(row_tokens.tolist())
        assert seen <= allowed, f"top_k={k} emitted {sorted(seen - allowed)}"
        if 1 < k <= 5:
            assert seen == allowed, f"top_k={k}: never drew {sorted(allowed - seen)}"


def _nucleus(probs: np.ndarray, p: float) -> set[int]:
    order = np.argsort(-probs)
    cum = np.cumsum(probs[order])
    size = int(np.searchsorted(cum, p) + 1)  # smallest prefix with cumulative mass >= p
    return set(order[:size].tolist())


@pytest.mark.parametrize("top_p", [1e-6, 0.3, 0.55, 0.8, 0.95])
def test_top_p_stays_in_the_smallest_nucleus(top_p: float) -> None:
    probs = _softmax(LOGITS_12)
    tokens = _draw(LOGITS_12, SamplingRow(1.0, -1, top_p, seed=11), 5000)
    nucleus = _nucleus(probs, top_p)
    seen = set(tokens.tolist())
    assert seen <= nucleus, f"top_p={top_p} emitted {sorted(seen - nucleus)}"
    assert seen == nucleus  # every member (>= ~2% each here) shows up in 5000 draws
    assert int(np.argmax(probs)) in seen  # the top token is always allowed


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_frequencies_match_tempered_softmax(temperature: float) -> None:
    tokens = _draw(LOGITS_12, SamplingRow(temperature, seed=21))
    stat, dof = _chi2(tokens, _softmax(LOGITS_12 / temperature))
    assert stat < CHI2_CRIT_999[dof], (stat, dof)


def test_chi_square_rejects_the_wrong_temperature() -> None:
    """Negative control: draws at T=0.5 are not softmax(logits) (T=1)."""
    tokens = _draw(LOGITS_12, SamplingRow(0.5, seed=21))
    stat, dof = _chi2(tokens, _softmax(LOGITS_12))
    assert stat > 10 * CHI2_CRIT_999[dof]


def test_truncated_frequencies_are_the_renormalised_kept_set() -> None:
    """top-k=8 then top-p=0.8 at T=0.7: draws follow softmax over the kept tokens only."""
    temperature, k, p = 0.7, 8, 0.8
    tempered = _softmax(LOGITS_12 / temperature)
    top_k_set = np.argsort(-tempered)[:k]
    renorm = np.zeros_like(tempered)
    renorm[top_k_set] = tempered[top_k_set] / tempered[top_k_set].sum()
    kept = np.array(sorted(_nucleus(renorm, p)))
    expected = np.zeros_like(tempered)
    expected[kept] = tempered[kept] / tempered[kept].sum()
    tokens = _draw(LOGITS_12, SamplingRow(temperature, k, p, seed=5))
    stat, dof = _chi2(tokens, expected)
    assert stat < CHI2_CRIT_999[dof], (stat, dof)


def test_negative_infinite_logits_are_never_drawn() -> None:
    logits = np.full(12, -np.inf, np.float32)
    logits[[2, 7]] = [0.0, 1.0]
    tokens = _draw(logits, SamplingRow(1.0, seed=1))
    assert set(tokens.tolist()) == {2, 7}
    tokens = _draw(logits, SamplingRow(1.0, top_k=5, top_p=0.999, seed=1))
    assert set(tokens.tolist()) == {2, 7}


def test_a_tiny_positive_temperature_is_a_finite_point_mass() -> None:
    """``logits / T`` must not overflow: two overflowed logits would tie (the lower id would
    win) and the logprob would be NaN."""
    logits = np.float32([40.0, 10.0, -5.0, 41.0])
    for temperature in (1e-4, 1e-30, 1e-37):
        row = SamplingRow(temperature, seed=3)
        tokens, logprobs = sample_tokens(
            jnp.asarray(logits[None]), RowSamplingParams.stack([row]), jnp.zeros((1, 2), jnp.uint32)
        )
        assert int(tokens[0]) == 3
        assert float(logprobs[0]) == 0.0
