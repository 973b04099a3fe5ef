"""Token selection and log-probability kernels: pure, jit-compatible, per-row parameterised.

`sample_tokens` turns one decode step's logits into one token per row. Every row carries its
own temperature, top-k, top-p and key as array values (`RowSamplingParams`), so the one
compiled step serves any mix of requests without recompiling.

Selection, per row with temperature ``T``:

* ``T == 0``: greedy, ``argmax(logits)``.
* otherwise the tempered logits ``z = logits / T`` are truncated, then a token is drawn by
  Gumbel-max (``argmax(z + g)`` over the kept tokens, ``g ~ Gumbel(0, 1)`` from the row's key),
  which is an exact draw from ``softmax(z)`` restricted to the kept set.
* truncation: top-k first, then top-p on the renormalised top-k distribution (vLLM's and
  Hugging Face's order). Both become one threshold on ``z``: a token is kept iff its tempered
  logit is >= that of the last kept token in descending order. Ties at the boundary are kept.
  top-p keeps the smallest prefix whose cumulative probability reaches ``p`` (the top token is
  always kept). A row with neither filter keeps everything, and a batch where no row filters
  skips the O(V log V) sort altogether (`lax.cond`); the two paths give identical tokens since
  the noise is indexed by token id either way.

**Which logprob is returned** (Tinker's RL code uses it as the sampling log-probability in
importance ratios): ``log_softmax(logits / T)[token]``, the log-probability under the
*tempered* model distribution, with the top-k/top-p truncation *not* renormalised into it. At
``T = 1`` (the usual RL setting) this is exactly the trainer's forward-pass logprob of the same
token. For greedy rows (``T = 0``) it is ``log_softmax(logits)[token]`` (temperature 1), since
the limit ``T -> 0`` is a degenerate 0. Truncation is left out because its renormaliser is a
property of the sampler's settings rather than of the model, and the trainer cannot reproduce it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tx_engine.sampling.params import RowSamplingParams


def sample_tokens(
    logits_bv: jax.Array, params: RowSamplingParams, step_keys: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One token per row and its logprob (definition in the module docstring).

    ``step_keys`` is raw key data ``uint32[B, 2]``, normally `decode_keys(params.key_data,
    step_b)`. Returns ``(tokens_b int32, logprobs_b float32)``.
    """
    logits_bv = logits_bv.astype(jnp.float32)
    temperature_b = jnp.asarray(params.temperature, jnp.float32)
    greedy_b = temperature_b <= 0.0
    scaled_bv = logits_bv / _divisor(temperature_b)[:, None]

    keep_bv = _keep_mask(scaled_bv, params)
    noise_bv = _gumbel_noise(step_keys, logits_bv.shape[-1])
    perturbed_bv = jnp.where(keep_bv, scaled_bv + noise_bv, -jnp.inf)
    drawn_b = _argmax(perturbed_bv)
    tokens_b = jnp.where(greedy_b, _argmax(logits_bv), drawn_b)

    logprobs_b = _logprob_at(scaled_bv, tokens_b)
    return tokens_b, logprobs_b


def _argmax(x_bv: jax.Array) -> jax.Array:
    """``jnp.argmax(x, -1)`` as int32 (first maximum; first NaN if any), as two plain reductions.

    Why: ``jnp.argmax`` is a variadic (value, index) reduce, which XLA:CPU does not vectorise;
    fused with the Gumbel noise it ran the whole hash as scalar code (~8x slower at batch 64
    than a max followed by a min over the indices that reach it).
    """
    max_b1 = jnp.max(x_bv, axis=-1, keepdims=True)  # NaN if the row has one
    hit_bv = (x_bv == max_b1) | jnp.isnan(x_bv)
    iota_bv = jax.lax.broadcasted_iota(jnp.int32, x_bv.shape, x_bv.ndim - 1)
    return jnp.min(jnp.where(hit_bv, iota_bv, x_bv.shape[-1]), axis=-1)


def _gumbel_noise(key_data_b2: jax.Array, vocab: int) -> jax.Array:
    """Gumbel(0, 1) noise ``[B, V]``, each row a function of that row's key only.

    Bit for bit ``jax.random.gumbel(key, (vocab,), float32)`` for each row's threefry key
    (partitionable threefry, the JAX default; tests check the equality), written out as plain
    array ops. Why: XLA:CPU lowers ``jax.random``'s threefry as a *rolled* 5-iteration loop
    that writes several ``uint32[B, V]`` arrays per iteration, which made the noise the most
    expensive part of a large-batch decode step; unrolled, the hash, the ``-log(-log(u))``
    and the caller's ``argmax`` fuse into one pass that writes nothing of size ``V``.
    """
    key_b2 = jnp.asarray(key_data_b2, jnp.uint32)
    bits_bv = _threefry_bits(key_b2[:, :1], key_b2[:, 1:], vocab)
    # jax.random.uniform(minval=tiny, maxval=1): 23 random mantissa bits -> [1, 2) - 1.
    one = jnp.float32(1.0)
    tiny = jnp.float32(np.finfo(np.float32).tiny)
    mantissa = jax.lax.shift_right_logical(bits_bv, jnp.uint32(9)) | jnp.uint32(0x3F800000)
    floats = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - one
    uniform = jax.lax.max(tiny, floats * (one - tiny) + tiny)
    return -jnp.log(-jnp.log(uniform))


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry_bits(k1_b1: jax.Array, k2_b1: jax.Array, n: int) -> jax.Array:
    """``uint32[B, n]``: JAX's 32-bit random bits for counters ``0..n-1`` (threefry-2x32,
    partitionable layout: counter ``i`` is the pair ``(0, i)``, the bits are ``x0 ^ x1``)."""
    ks = (k1_b1, k2_b1, k1_b1 ^ k2_b1 ^ jnp.uint32(0x1BD11BDA))
    x0 = jnp.broadcast_to(ks[0], (k1_b1.shape[0], n))
    x1 = jax.lax.broadcasted_iota(jnp.uint32, (1, n), 1) + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = (x1 << jnp.uint32(r)) | jax.lax.shift_right_logical(x1, jnp.uint32(32 - r))
            x1 = x0 ^ x1
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
    return x0 ^ x1


def _keep_mask(scaled_bv: jax.Array, params: RowSamplingParams) -> jax.Array:
    """Boolean ``[B, V]``: the tokens top-k and top-p leave in play for each row."""
    vocab = scaled_bv.shape[-1]
    top_k_b = jnp.asarray(params.top_k, jnp.int32)
    top_p_b = jnp.asarray(params.top_p, jnp.float32)
    k_b = jnp.where((top_k_b <= 0) | (top_k_b >= vocab), vocab, top_k_b)
    any_filter = jnp.any((k_b < vocab) | (top_p_b < 1.0))
    threshold_b: jax.Array = jax.lax.cond(
        any_filter,
        lambda: _threshold(scaled_bv, k_b, top_p_b),
        lambda: jnp.full(scaled_bv.shape[:1], -jnp.inf, jnp.float32),
    )
    return scaled_bv >= threshold_b[:, None]


def _threshold(scaled_bv: jax.Array, k_b: jax.Array, top_p_b: jax.Array) -> jax.Array:
    """Per row, the smallest tempered logit still kept by top-k then top-p."""
    vocab = scaled_bv.shape[-1]
    sorted_bv = -jnp.sort(-scaled_bv, axis=-1)  # descending
    rank_v = jnp.arange(vocab, dtype=jnp.int32)
    in_top_k_bv = rank_v[None, :] < k_b[:, None]
    probs_bv = jax.nn.softmax(jnp.where(in_top_k_bv, sorted_bv, -jnp.inf), axis=-1)
    # Keep rank r while the mass strictly before it is < p: the smallest prefix reaching p.
    mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
    # p >= 1 is "off" explicitly: float round-off in the cumsum must not cut the tail.
    in_top_p_bv = (mass_before_bv < top_p_b[:, None]) | (top_p_b[:, None] >= 1.0)
    keep_count_b = jnp.sum(in_top_k_bv & in_top_p_bv, axis=-1)
    keep_count_b = jnp.maximum(keep_count_b, 1)  # the top token is always in play
    return jnp.take_along_axis(sorted_bv, (keep_count_b - 1)[:, None], axis=-1)[:, 0]


def _logprob_at(logits_xv: jax.Array, tokens_x: jax.Array) -> jax.Array:
    """``log_softmax(logits)[token]`` without materialising the full log-softmax."""
    picked_x = jnp.take_along_axis(logits_xv, tokens_x[..., None].astype(jnp.int32), axis=-1)
    return picked_x[..., 0] - jax.nn.logsumexp(logits_xv, axis=-1)


def _tempered(logits_xv: jax.Array, temperature: jax.typing.ArrayLike | None) -> jax.Array:
    """Logits divided by a temperature broadcast over leading dims; T <= 0 is scored at T=1."""
    logits_xv = logits_xv.astype(jnp.float32)
    if temperature is None:
        return logits_xv
    t = _divisor(jnp.asarray(temperature, jnp.float32))
    return logits_xv / t.reshape(t.shape + (1,) * (logits_xv.ndim - t.ndim))


MIN_TEMPERATURE = 1e-30
"""The smallest temperature the logits are divided by. A positive ``T`` below it would send
``logits / T`` to ±inf in float32 (NaN logprobs, and ties between overflowed tokens); at it
the tempered distribution is already a point mass on the top token, so nothing else changes."""


def _divisor(t: jax.Array) -> jax.Array:
    """What tempered logits divide by: ``T``, at least :data:`MIN_TEMPERATURE`; 1 for greedy
    rows (``T <= 0``), which are scored at ``T = 1``."""
    return jnp.where(t <= 0.0, 1.0, jnp.maximum(t, MIN_TEMPERATURE))


def token_logprobs(
    logits_btv: jax.Array, tokens_bt: jax.Array, temperature: jax.Array | float | None = None
) -> jax.Array:
    """``log_softmax(logits / T)`` at the given tokens (prompt logprobs, target scoring).

    Works for any leading shape (``[B, T, V]`` with ``[B, T]`` tokens, or ``[B, V]`` with
    ``[B]``). ``temperature`` (a scalar or an array over the leading dims, e.g. ``[B]``) defaults
    to 1, which is the trainer's forward-pass logprob; T <= 0 is scored at 1 like greedy rows.
    """
    return _logprob_at(_tempered(logits_btv, temperature), tokens_bt)


def topk_logprobs(
    logits_btv: jax.Array, k: int, temperature: jax.typing.ArrayLike | None = None
) -> tuple[jax.Array, jax.Array]:
    """The ``k`` most likely tokens and their logprobs, sorted descending (ties: lower id first).

    ``k`` is static (it sets the output shape); ``temperature`` as in `token_logprobs`.
    Returns ``(ids int32[..., k], logprobs float32[..., k])`` for any leading shape.
    """
    vocab = logits_btv.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k: must be in [1, {vocab}] (the vocabulary size), got {k}")
    scaled = _tempered(logits_btv, temperature)
    top_logits, ids = jax.lax.top_k(scaled, k)
    logprobs = top_logits - jax.nn.logsumexp(scaled, axis=-1, keepdims=True)
    return ids.astype(jnp.int32), logprobs
