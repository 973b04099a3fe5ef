"""The sampling programs: prefill, admit (continuous batching), decode steps, cache moves.

They take the same ``graphdef`` / ``lora`` / ``rest`` pieces as the training programs, so a
sampled token is scored by exactly the weights that :func:`tx_engine.step.forward` uses.
``graphdef`` is static; pass the engine's :class:`StaticGraph` (hashed once) rather than a bare
``GraphDef``, whose hash walks its whole node tree on every dispatch. For the same reason a
sampling run passes ``lora`` / ``rest`` as :class:`FlatState` (as the engine holds them): jit
flattens an ``nnx.State`` argument in Python, one callback per variable, ~1 ms per dispatch
for the small preset's ~260 variables, against ~0.07 ms for the same arrays pre-flattened
(:mod:`tx_engine.step.flat_state`).
"""

from __future__ import annotations

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
from tx_engine.sampling.decode import decode_logits
from tx_engine.step.flat_state import FlatState, state_of
from tx_engine.step.graph import TRACE_COUNTS, State, StaticGraph, graph_of


def _merge(graphdef: nnx.GraphDef[Any] | StaticGraph, lora: Any, rest: Any) -> Any:
    return nnx.merge(graph_of(graphdef), state_of(lora), state_of(rest))


class Scoring(NamedTuple):
    """Which prompt scores a prefill computes (static: each combination is its own program).

    ``topk``, ``target_k`` and ``alt_k`` are bucketed by the caller (0 = off).
    """

    logprobs: bool = False
    topk: int = 0
    target_k: int = 0
    alt_k: int = 0

    @property
    def any(self) -> bool:
        return bool(self.logprobs or self.topk or self.target_k or self.alt_k)


NO_SCORING = Scoring()


class PromptScores(NamedTuple):
    """Per prefill row, column ``j`` scores prompt column ``j+1`` given the columns before it.

    ``logprobs_pt`` ``[P, T-1]``; ``topk_*`` ``[P, T-1, k]`` (best first); ``target_ptk``
    ``[P, T-1, K]`` logprobs of the given target ids (0 where the id is -1); ``alt_*``
    ``[P, T-1, k]`` independent draws from the row's sampling distribution and their logprobs.
    A field is None unless asked for in :class:`Scoring`.
    """

    logprobs_pt: Array | None = None
    topk_ids_ptk: Array | None = None
    topk_logprobs_ptk: Array | None = None
    target_ptk: Array | None = None
    alt_ids_ptk: Array | None = None
    alt_logprobs_ptk: Array | None = None


class PrefillOut(NamedTuple):
    """First sampled token per decode row, prompt scores per prefill row, the expanded cache."""

    tokens_b: Array
    logprobs_b: Array
    scores: PromptScores
    cache: KVCache


class AdmitOut(NamedTuple):
    """What :func:`admit` returns: ``next_tokens_b`` is what the next decode step feeds (the
    admitted rows' token 0, the other rows' previous token); ``*_r`` are per admitted row."""

    next_tokens_b: Array
    tokens_r: Array
    logprobs_r: Array
    topk_ids_rk: Array | None
    topk_logprobs_rk: Array | None
    scores: PromptScores
    cache: KVCache


def _run_prompts(
    model: Any, tokens_pt: Array, positions_pt: Array, mask_pt: Array, adapters_p: Array,
    cache_len: int, context: KVCache | None = None,
) -> tuple[Array, KVCache]:  # fmt: skip
    """Left-padded prompts through a fresh ``cache_len``-slot cache: hidden states and cache.

    ``context`` (``C`` slots per prompt, index ``C``): keys/values the prompts continue from
    (a cached prefix); the fresh slots follow it, so the result has ``C + cache_len`` slots.
    """
    cfg = model.config
    cache = KVCache.empty(
        cfg.num_hidden_layers, tokens_pt.shape[0], cache_len, cfg.num_key_value_heads,
        cfg.head_dim, model.dtype,
    )  # fmt: skip
    if context is not None:
        cache = KVCache(
            jnp.concatenate([context.k_lbskh, cache.k_lbskh], axis=2),
            jnp.concatenate([context.v_lbskh, cache.v_lbskh], axis=2),
            jnp.concatenate([context.mask_bs, cache.mask_bs], axis=1),
            context.index,
        )
    hidden_ptd, cache = model(
        tokens_pt,
        positions_bt=positions_pt,
        attention_mask_bt=mask_pt,
        adapter_indices_b=adapters_p,
        kv_cache=cache,
    )
    return hidden_ptd, cache


def _prompt_outputs(
    model: Any,
    hidden_ptd: Array,
    tokens_pt: Array,
    positions_pt: Array,
    adapters_p: Array,
    scoring: Scoring,
    targets_ptk: Array | None,
    alt_params_p: RowSamplingParams | None,
) -> tuple[Array, PromptScores]:
    """The last column's logits ``[P, V]`` and the prompt scores asked for by ``scoring``."""
    if not scoring.any:  # left padding: every prompt's last token is the last column
        return model.compute_logits(hidden_ptd[:, -1:], adapters_p)[:, 0], PromptScores()
    logits_ptv = model.compute_logits(hidden_ptd, adapters_p)
    # Column j scores prompt token j+1, so the last column scores nothing. Scores are computed
    # for all T columns and their last one dropped: cutting the [P, T, V] logits to T-1 columns
    # first would copy them (16 MB for 128 tokens of a 32k vocabulary, ~3 ms on 2 CPU cores).
    next_pt = jnp.pad(tokens_pt[:, 1:], ((0, 0), (0, 1)))
    scores = PromptScores()
    if scoring.logprobs:
        scores = scores._replace(logprobs_pt=token_logprobs(logits_ptv, next_pt)[:, :-1])
    if scoring.topk:
        ids, lps = topk_logprobs(logits_ptv, scoring.topk)
        scores = scores._replace(topk_ids_ptk=ids[:, :-1], topk_logprobs_ptk=lps[:, :-1])
    if scoring.target_k:
        assert targets_ptk is not None
        targets = jnp.pad(targets_ptk, ((0, 0), (0, 1), (0, 0)), constant_values=-1)
        scores = scores._replace(target_ptk=_score_targets(logits_ptv, targets)[:, :-1])
    if scoring.alt_k:
        assert alt_params_p is not None
        ctx_pcv = logits_ptv[:, :-1]
        ids, lps = _alt_draws(ctx_pcv, positions_pt[:, 1:], alt_params_p, scoring.alt_k)
        scores = scores._replace(alt_ids_ptk=ids, alt_logprobs_ptk=lps)
    return logits_ptv[:, -1], scores


def _score_targets(logits_pcv: Array, targets_pck: Array) -> Array:
    """``log_softmax(logits)`` at each of the K target ids per column; 0.0 where the id is -1."""
    logits_pcv = logits_pcv.astype(jnp.float32)
    lse_pc1 = jax.nn.logsumexp(logits_pcv, axis=-1, keepdims=True)
    picked = jnp.take_along_axis(logits_pcv, jnp.maximum(targets_pck, 0), axis=-1)
    return jnp.where(targets_pck >= 0, picked - lse_pc1, 0.0)


def _alt_draws(
    logits_pcv: Array, positions_pc: Array, params_p: RowSamplingParams, k: int
) -> tuple[Array, Array]:
    """``k`` independent draws per column with the row's sampling values (:func:`sample_tokens`).

    Draw ``j`` at a column predicting prompt position ``q`` uses the row's key folded with
    ``q`` then ``j``: a function of (seed, position, draw) only, so neither the prompt bucket
    nor the batch changes it. Draws run one at a time (``lax.map``) to hold one ``[P·C, V]``
    noise array at once.
    """
    p, c, v = logits_pcv.shape
    flat_nv = logits_pcv.reshape(p * c, v)
    rows: RowSamplingParams = jax.tree.map(lambda x: jnp.repeat(x, c, axis=0), params_p)
    base_n2 = decode_keys(rows.key_data, positions_pc.reshape(-1).astype(jnp.uint32))

    def draw(j: Array) -> tuple[Array, Array]:
        keys = decode_keys(base_n2, jnp.broadcast_to(j.astype(jnp.uint32), (p * c,)))
        return sample_tokens(flat_nv, rows, keys)

    ids_kn, lps_kn = jax.lax.map(draw, jnp.arange(k))
    return ids_kn.T.reshape(p, c, k), lps_kn.T.reshape(p, c, k)


def _first_tokens(
    last_rv: Array, params: RowSamplingParams, sample_topk: int
) -> tuple[Array, Array, Array | None, Array | None]:
    """Token 0 of each row (keys fold in step 0) and, if asked, its top-k logprobs."""
    keys = decode_keys(params.key_data, jnp.zeros(last_rv.shape[:1], jnp.uint32))
    tokens, logprobs = sample_tokens(last_rv, params, keys)
    if not sample_topk:
        return tokens, logprobs, None, None
    ids, lps = topk_logprobs(last_rv, sample_topk, params.temperature)
    return tokens, logprobs, ids, lps


@partial(jax.jit, static_argnames=("graphdef", "cache_len", "prompt_logprobs", "prompt_topk"))
def prefill(
    graphdef: nnx.GraphDef[Any] | StaticGraph,
    lora: State | FlatState,
    rest: State | FlatState,
    tokens_pt: Array,
    positions_pt: Array,
    mask_pt: Array,
    adapters_p: Array,
    row_src_b: Array,
    params: RowSamplingParams,
    *,
    cache_len: int,
    prompt_logprobs: bool = False,
    prompt_topk: int = 0,
) -> PrefillOut:
    """Prompts into a fresh ``cache_len``-slot cache, copied to ``row_src_b`` rows; token 0.

    One-shot layout (benchmarks, tests): the prompts are left-padded to ``T``, so the cache's
    write index is ``T`` for every row. The sampler itself uses :func:`admit`.
    """
    TRACE_COUNTS["prefill"] += 1
    model: Any = _merge(graphdef, lora, rest)
    hidden_ptd, cache = _run_prompts(model, tokens_pt, positions_pt, mask_pt, adapters_p, cache_len)
    scoring = Scoring(logprobs=prompt_logprobs, topk=prompt_topk)
    last_pv, scores = _prompt_outputs(
        model, hidden_ptd, tokens_pt, positions_pt, adapters_p, scoring, None, None
    )
    cache = KVCache(
        cache.k_lbskh[:, row_src_b], cache.v_lbskh[:, row_src_b], cache.mask_bs[row_src_b],
        cache.index,
    )  # fmt: skip
    tokens_b, logprobs_b, _, _ = _first_tokens(last_pv[row_src_b], params, 0)
    return PrefillOut(tokens_b, logprobs_b, scores, cache)


@partial(
    jax.jit,
    static_argnames=("graphdef", "scoring", "sample_topk"),
    donate_argnames=("cache",),
)
def admit(
    graphdef: nnx.GraphDef[Any] | StaticGraph,
    lora: State | FlatState,
    rest: State | FlatState,
    prompts: tuple[Array, Array, Array, Array],
    src_r: Array,
    dst_r: Array,
    params_r: RowSamplingParams,
    prev_tokens_b: Array,
    index: Array,
    cache: KVCache,
    targets_ptk: Array | None = None,
    alt_params_p: RowSamplingParams | None = None,
    pool: KVCache | None = None,
    context_pc: Array | None = None,
    *,
    scoring: Scoring = NO_SCORING,
    sample_topk: int = 0,
) -> AdmitOut:
    """Prefill ``P`` prompts into rows ``dst_r`` of a running cache (continuous batching).

    ``prompts`` = (tokens, positions, mask, adapters) of the ``P`` left-padded prompts
    (``[P, T]`` ×3 and ``[P]``). They run through their own ``T``-slot cache; admitted row ``r``
    then gets prefill row ``src_r[r]``'s keys/values at slots ``index-T .. index-1`` of cache row
    ``dst_r[r]`` (the rest of that row's mask is cleared; ``dst_r = B`` marks padding, dropped),
    and the cache's shared write index becomes ``index``. The caller guarantees
    ``index >= T`` and that no live row needs the overwritten row. ``cache`` is donated.

    With ``context_pc`` (``[P, C]`` slots of the prefix pool ``pool``, -1 = masked), each
    prompt continues a cached prefix: its ``C`` keys/values come first, the ``T`` columns are
    the rest of the prompt (positions from ``C``), and the row gets all ``C + T`` slots, at
    ``index-C-T .. index-1`` (:mod:`tx_engine.sampling.prefix_cache`).
    """
    TRACE_COUNTS["admit"] += 1
    model: Any = _merge(graphdef, lora, rest)
    tokens_pt, positions_pt, mask_pt, adapters_p = prompts
    context = None if context_pc is None else _gather_context(pool, context_pc)
    hidden_ptd, fresh = _run_prompts(
        model, tokens_pt, positions_pt, mask_pt, adapters_p, tokens_pt.shape[1], context
    )
    t = fresh.mask_bs.shape[1]
    last_pv, scores = _prompt_outputs(
        model, hidden_ptd, tokens_pt, positions_pt, adapters_p, scoring, targets_ptk,
        alt_params_p,
    )  # fmt: skip
    tokens_r, logprobs_r, ids_rk, lps_rk = _first_tokens(last_pv[src_r], params_r, sample_topk)
    rows_r1, slots_1t = dst_r[:, None], (index - t + jnp.arange(t))[None, :]
    k = cache.k_lbskh.at[:, rows_r1, slots_1t].set(fresh.k_lbskh[:, src_r], mode="drop")
    v = cache.v_lbskh.at[:, rows_r1, slots_1t].set(fresh.v_lbskh[:, src_r], mode="drop")
    mask = cache.mask_bs.at[dst_r].set(False, mode="drop")
    mask = mask.at[rows_r1, slots_1t].set(fresh.mask_bs[src_r], mode="drop")
    new_cache = KVCache(k, v, mask, jnp.asarray(index, jnp.int32))
    next_b = prev_tokens_b.at[dst_r].set(tokens_r, mode="drop")
    return AdmitOut(next_b, tokens_r, logprobs_r, ids_rk, lps_rk, scores, new_cache)


def _gather_context(pool: KVCache | None, context_pc: Array) -> KVCache:
    """Pool slots ``context_pc`` as a ``[L, P, C, K, H]`` cache (-1 = masked), index ``C``."""
    assert pool is not None, "a context needs the pool it indexes"
    valid_pc = context_pc >= 0
    src_pc = jnp.where(valid_pc, context_pc, 0)
    return KVCache(
        pool.k_lbskh[:, 0, src_pc], pool.v_lbskh[:, 0, src_pc], valid_pc,
        jnp.asarray(context_pc.shape[1], jnp.int32),
    )  # fmt: skip


@partial(jax.jit, donate_argnames=("pool",))
def save_prefix(pool: KVCache, cache: KVCache, rows_r: Array, dst_rn: Array) -> KVCache:
    """Copy the first ``N`` unmasked slots of each cache row ``rows_r[r]`` into pool slots
    ``dst_rn[r]``: every sequence an admission or a fetch keeps, in one program.

    A row's unmasked slots, in slot order, are its tokens in order (prompt, then the tokens fed
    by decode steps): shifts and resizes keep the order. ``dst_rn`` entries past a row's tokens
    to keep are out of range (dropped), so ``R`` and ``N`` can be bucketed; a padding row has
    no slot in range. ``pool`` is a one-row cache.
    """
    TRACE_COUNTS["save_prefix"] += 1
    n = dst_rn.shape[1]
    slots_rn = jax.vmap(lambda m: jnp.nonzero(m, size=n, fill_value=0)[0])(cache.mask_bs[rows_r])
    rows_r1 = rows_r[:, None]
    k = pool.k_lbskh.at[:, 0, dst_rn].set(cache.k_lbskh[:, rows_r1, slots_rn], mode="drop")
    v = pool.v_lbskh.at[:, 0, dst_rn].set(cache.v_lbskh[:, rows_r1, slots_rn], mode="drop")
    return KVCache(k, v, pool.mask_bs, pool.index)


@partial(jax.jit, donate_argnames=("cache",))
def shift_cache(cache: KVCache, delta: Array) -> KVCache:
    """Move every row's slots ``delta`` to the left (right if negative); the index follows.

    Slot ``s`` of the result holds old slot ``s + delta``; slots with no source are masked.
    Attention is causal by slot and rope positions are separate, so a uniform shift changes no
    row's output: it only makes room at the end of the cache for newly admitted rows.
    """
    TRACE_COUNTS["shift_cache"] += 1
    s = cache.mask_bs.shape[1]
    src_s = jnp.arange(s) + delta
    valid_s = (src_s >= 0) & (src_s < s)
    src_s = jnp.clip(src_s, 0, s - 1)
    return KVCache(
        cache.k_lbskh[:, :, src_s], cache.v_lbskh[:, :, src_s],
        cache.mask_bs[:, src_s] & valid_s[None], cache.index - delta,
    )  # fmt: skip


@jax.jit
def resize_rows(cache: KVCache, tokens_b: Array, src_b: Array) -> tuple[KVCache, Array]:
    """The cache and next tokens rebuilt from rows ``src_b`` of the old ones.

    The new batch size is ``len(src_b)``; ``-1`` gives an empty row (every slot masked). Slots,
    the write index and the rows' contents are unchanged, so a kept row decodes as before: this
    only makes room for more rows (or drops rows no one reads). Not donated: the result has
    another shape, so XLA could not reuse the buffers.
    """
    TRACE_COUNTS["resize_rows"] += 1
    valid_b = src_b >= 0
    src_b = jnp.where(valid_b, src_b, 0)
    return (
        KVCache(
            cache.k_lbskh[:, src_b], cache.v_lbskh[:, src_b],
            cache.mask_bs[src_b] & valid_b[:, None], cache.index,
        ),
        tokens_b[src_b],
    )  # fmt: skip


@partial(jax.jit, static_argnames=("graphdef", "batch", "cache_len"))
def empty_cache(
    graphdef: nnx.GraphDef[Any] | StaticGraph,
    lora: State | FlatState,
    rest: State | FlatState,
    *,
    batch: int,
    cache_len: int,
) -> KVCache:
    """A zeroed ``batch × cache_len`` cache for the model (all slots masked, index 0)."""
    TRACE_COUNTS["empty_cache"] += 1
    model: Any = _merge(graphdef, lora, rest)
    cfg = model.config
    return KVCache.empty(
        cfg.num_hidden_layers, batch, cache_len, cfg.num_key_value_heads, cfg.head_dim,
        model.dtype,
    )  # fmt: skip


def _decode_and_sample(
    model: Any,
    last_tokens_b: Array,
    positions_b: Array,
    adapters_b: Array,
    params: RowSamplingParams,
    step: Array,
    cache: KVCache,
) -> tuple[Array, Array, Array, KVCache]:
    """One decode step's logits, sampled tokens and logprobs (keys fold in ``step``)."""
    logits_bv, cache = decode_logits(model, last_tokens_b, positions_b, adapters_b, cache)
    b = last_tokens_b.shape[0]
    keys = decode_keys(params.key_data, jnp.broadcast_to(step.astype(jnp.uint32), (b,)))
    tokens_b, logprobs_b = sample_tokens(logits_bv, params, keys)
    return logits_bv, tokens_b, logprobs_b, cache


def _decode_step(
    graphdef: nnx.GraphDef[Any] | StaticGraph,
    lora: State | FlatState,
    rest: State | FlatState,
    last_tokens_b: Array,
    positions_b: Array,
    adapters_b: Array,
    params: RowSamplingParams,
    step: Array,
    cache: KVCache,
) -> tuple[Array, Array, KVCache]:
    """Feed each row's previous token, sample its token ``step`` (keys fold in ``step``).

    ``step`` is a scalar or ``[B]`` (continuous batching: each row its own count). ``cache`` is
    donated: its buffers become the returned cache, so decoding never holds two. Rows that are
    done or free keep decoding harmlessly; the host ignores their output.
    """
    TRACE_COUNTS["decode_step"] += 1
    model: Any = _merge(graphdef, lora, rest)
    _, tokens_b, logprobs_b, cache = _decode_and_sample(
        model, last_tokens_b, positions_b, adapters_b, params, step, cache
    )
    return tokens_b, logprobs_b, cache


def _decode_step_topk(
    graphdef: nnx.GraphDef[Any] | StaticGraph,
    lora: State | FlatState,
    rest: State | FlatState,
    last_tokens_b: Array,
    positions_b: Array,
    adapters_b: Array,
    params: RowSamplingParams,
    step: Array,
    cache: KVCache,
    *,
    k: int,
) -> tuple[Array, Array, KVCache, Array, Array]:
    """:func:`decode_step` plus each row's ``k`` best tokens and logprobs under the same
    (tempered) distribution as the sampled logprob — ``topk_sample_logprobs``."""
    TRACE_COUNTS["decode_step_topk"] += 1
    model: Any = _merge(graphdef, lora, rest)
    logits_bv, tokens_b, logprobs_b, cache = _decode_and_sample(
        model, last_tokens_b, positions_b, adapters_b, params, step, cache
    )
    ids_bk, lps_bk = topk_logprobs(logits_bv, k, params.temperature)
    return tokens_b, logprobs_b, cache, ids_bk, lps_bk


decode_step = jax.jit(_decode_step, static_argnames=("graphdef",), donate_argnames=("cache",))
decode_step_topk = jax.jit(
    _decode_step_topk, static_argnames=("graphdef", "k"), donate_argnames=("cache",)
)


class DecodeChunk(NamedTuple):
    """What :func:`decode_chunk` returns. ``*_nb`` / ``*_nbk`` have ``chunk`` leading steps, of
    which the first ``n`` were run (the rest are zeros); ``last_b`` is what the next decode
    step feeds (step ``n-1``'s tokens). The top-k fields are None unless ``k`` is set."""

    tokens_nb: Array
    logprobs_nb: Array
    last_b: Array
    cache: KVCache
    topk_ids_nbk: Array | None
    topk_logprobs_nbk: Array | None


def _decode_chunk(
    graphdef: nnx.GraphDef[Any] | StaticGraph,
    lora: State | FlatState,
    rest: State | FlatState,
    last_tokens_b: Array,
    positions_b: Array,
    adapters_b: Array,
    params: RowSamplingParams,
    step: Array,
    cache: KVCache,
    n: Array,
    *,
    chunk: int,
    k: int = 0,
) -> DecodeChunk:
    """``n`` (``1 <= n <= chunk``, a device value) decode steps in one dispatch: step ``j``
    feeds step ``j-1``'s tokens at ``positions_b + j`` and samples token ``step + j``.

    The same computation as ``n`` calls of :func:`decode_step` (or, with ``k``,
    :func:`decode_step_topk`), token for token; what it saves is ``n - 1`` host round trips.
    A decode step of a small batch reads the weights once and does little else, so on an
    accelerator the host's per-step work (dispatch, fetch, stop checks) is the larger cost;
    the sampling run (:mod:`tx_engine.sampling.continuous`) checks stops every ``n`` steps
    instead. ``n`` is data, so every step count up to ``chunk`` shares one program.
    """
    TRACE_COUNTS["decode_chunk"] += 1
    model: Any = _merge(graphdef, lora, rest)
    b = last_tokens_b.shape[0]
    out = {
        "tokens": jnp.zeros((chunk, b), jnp.int32),
        "logprobs": jnp.zeros((chunk, b), jnp.float32),
    }
    if k:
        out["ids"] = jnp.zeros((chunk, b, k), jnp.int32)
        out["lps"] = jnp.zeros((chunk, b, k), jnp.float32)

    def one_step(j: Array, carry: tuple[Any, ...]) -> tuple[Any, ...]:
        last_b, cache, out = carry
        logits_bv, tokens_b, logprobs_b, cache = _decode_and_sample(
            model, last_b, positions_b + j, adapters_b, params, step + j, cache
        )
        got = {"tokens": tokens_b, "logprobs": logprobs_b}
        if k:
            got["ids"], got["lps"] = topk_logprobs(logits_bv, k, params.temperature)
        out = {name: out[name].at[j].set(got[name]) for name in out}
        return tokens_b, cache, out

    last_b, cache, out = jax.lax.fori_loop(0, n, one_step, (last_tokens_b, cache, out))
    return DecodeChunk(
        out["tokens"], out["logprobs"], last_b, cache, out.get("ids"), out.get("lps")
    )


decode_chunk = jax.jit(
    _decode_chunk, static_argnames=("graphdef", "chunk", "k"), donate_argnames=("cache",)
)
