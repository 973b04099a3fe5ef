"""The compiled sampling programs: KV-cache prefill and one decode step.

This is a sibling of :mod:`tx_engine.step` only because ``step.py`` was being edited by another
helper when these were written; the lead will fold them into ``step.py`` (the convention is one
module of jit boundaries). Both programs take the model as the trainer's three pieces
(``graphdef`` static, ``lora``, ``rest``), so a sampled token is scored by exactly the weights —
base and LoRA slots — that ``forward`` and ``forward_backward`` use.

Layout (built by :mod:`tx_engine.sampler`): the prompts of ``P`` requests are **left**-padded to a
bucketed length ``T``, so every prompt ends at column ``T-1`` and the cache's shared write index
is ``T`` for all rows after prefill; decode step ``i`` writes slot ``T+i-1``. The cache has
``S`` slots (bucketed). ``row_src_b`` maps each of the ``B`` decode rows (request × sample) to its
prefill row: a request with ``num_samples = n`` is prefilled once and its cache rows copied ``n``
times. All per-row sampling values are arrays (:class:`RowSamplingParams`), so only ``P``,
``T``, ``B``, ``S`` and the two prompt-logprob flags select a program.

:data:`TRACE_COUNTS` counts traces per program; tests use it to prove no recompilation.
"""

from __future__ import annotations

from collections import Counter
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import Array

from tx_engine.layers.attention import KVCache
from tx_engine.sampling import (
    RowSamplingParams,
    decode_keys,
    sample_tokens,
    token_logprobs,
    topk_logprobs,
)

State = nnx.State[Any, Any]
TRACE_COUNTS: Counter[str] = Counter()


class PrefillOut(NamedTuple):
    """First sampled token per decode row, prompt scores per prefill row, the expanded cache.

    ``prompt_logprobs_pt`` ``[P, T-1]``: column ``j`` scores prompt column ``j+1`` given the
    columns before it (None unless asked). ``topk_*`` ``[P, T-1, k]`` likewise.
    """

    tokens_b: Array
    logprobs_b: Array
    prompt_logprobs_pt: Array | None
    topk_ids_ptk: Array | None
    topk_logprobs_ptk: Array | None
    cache: KVCache


@partial(
    jax.jit,
    static_argnames=("graphdef", "cache_len", "prompt_logprobs", "prompt_topk"),
)
def prefill(
    graphdef: nnx.GraphDef[Any],
    lora: State,
    rest: State,
    tokens_pt: Array,
    positions_pt: Array,
    mask_pt: Array,
    adapters_p: Array,
    row_src_b: Array,
    params: RowSamplingParams,
    *,
    cache_len: int,
    prompt_logprobs: bool,
    prompt_topk: int,
) -> PrefillOut:
    """Run the prompts through a fresh ``cache_len``-slot cache and sample token 0 per row."""
    TRACE_COUNTS["prefill"] += 1
    model: Any = nnx.merge(graphdef, lora, rest)
    cfg = model.config
    p = tokens_pt.shape[0]
    cache = KVCache.empty(
        cfg.num_hidden_layers, p, cache_len, cfg.num_key_value_heads, cfg.head_dim, model.dtype
    )
    hidden_ptd, cache = model(
        tokens_pt,
        positions_bt=positions_pt,
        attention_mask_bt=mask_pt,
        adapter_indices_b=adapters_p,
        kv_cache=cache,
    )
    lp_pt = ids_ptk = lp_ptk = None
    if prompt_logprobs or prompt_topk:
        logits_ptv = model.compute_logits(hidden_ptd, adapters_p)
        last_pv = logits_ptv[:, -1]
        if prompt_logprobs:
            lp_pt = token_logprobs(logits_ptv[:, :-1], tokens_pt[:, 1:])
        if prompt_topk:
            ids_ptk, lp_ptk = topk_logprobs(logits_ptv[:, :-1], prompt_topk)
    else:  # left padding: every prompt's last token is the last column
        last_pv = model.compute_logits(hidden_ptd[:, -1:], adapters_p)[:, 0]
    cache = KVCache(
        cache.k_lbskh[:, row_src_b],
        cache.v_lbskh[:, row_src_b],
        cache.mask_bs[row_src_b],
        cache.index,
    )
    keys = decode_keys(params.key_data, jnp.zeros(row_src_b.shape, jnp.uint32))
    tokens_b, logprobs_b = sample_tokens(last_pv[row_src_b], params, keys)
    return PrefillOut(tokens_b, logprobs_b, lp_pt, ids_ptk, lp_ptk, cache)


@partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def decode_step(
    graphdef: nnx.GraphDef[Any],
    lora: State,
    rest: State,
    last_tokens_b: Array,
    positions_b: Array,
    adapters_b: Array,
    params: RowSamplingParams,
    step: Array,
    cache: KVCache,
) -> tuple[Array, Array, KVCache]:
    """Feed each row's previous token, sample token ``step`` (keys fold in ``step``).

    ``cache`` is donated: its buffers become the returned cache, so decoding never holds two.
    Finished rows keep decoding harmlessly; the host ignores their output.
    """
    TRACE_COUNTS["decode_step"] += 1
    model: Any = nnx.merge(graphdef, lora, rest)
    b = last_tokens_b.shape[0]
    hidden_b1d, cache = model(
        last_tokens_b[:, None],
        positions_bt=positions_b[:, None],
        attention_mask_bt=jnp.ones((b, 1), bool),
        adapter_indices_b=adapters_b,
        kv_cache=cache,
    )
    logits_bv = model.compute_logits(hidden_b1d, adapters_b)[:, 0]
    keys = decode_keys(params.key_data, jnp.broadcast_to(step.astype(jnp.uint32), (b,)))
    tokens_b, logprobs_b = sample_tokens(logits_bv, params, keys)
    return tokens_b, logprobs_b, cache
