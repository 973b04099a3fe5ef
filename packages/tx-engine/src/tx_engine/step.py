"""The compiled programs — training and sampling — the only ``jax.jit`` in tx-engine.

The model lives here as three pieces so that each program is a pure function: ``graphdef``
(static structure, hashable, a static argument), ``lora`` (the :class:`LoRAParam` state, the
only thing differentiated and updated) and ``rest`` (base weights and LoRA scalings, read only).
A batch is the dict produced by :func:`tx_engine.batching.pack`; its shapes are bucketed there,
so a new batch size or length inside a bucket reuses the compiled program.

* :func:`forward` — per-datum loss outputs, no gradient.
* :func:`forward_backward` — the same outputs, and the gradient of the *summed* loss w.r.t.
  every adapter slot's factors, **added** into the gradient accumulator ``grads``. Rows of
  adapter ``s`` only touch slot ``s``'s gradient (the LoRA gather makes the other slots'
  cotangents zero), so one call serves many tenants and accumulation across calls and
  micro-batches is a plain sum. ``grads`` is donated: its buffer becomes the output. With
  ``rank`` (the engine passes its rank bucket) only those rank entries are differentiated and
  added, in place.
* :func:`apply_update` — AdamW (:mod:`tx_engine.optim`) on a subset of slots (the engine's
  live ones) at a rank bucket, for the entries in ``step_mask``, and a reset of those slots'
  accumulators; params, optimizer state and accumulator are donated.

The engine passes graphdefs wrapped in :class:`StaticGraph` (hashed once per graphdef, not
per dispatch); every training program also takes a bare ``GraphDef``.

Target log-probs are computed ``logits_chunk`` tokens at a time (static; see
:func:`_target_logprobs`), so ``[B, T, V]`` logits never exist at once. The loss name is static
(each loss is a different program); loss config values and optimizer
hyperparameters are traced arrays, so changing them never recompiles. :data:`TRACE_COUNTS`
counts traces per program — tests use it to prove the absence of recompilation.

Sampling (:func:`prefill`, :func:`decode_step`) uses the same three model pieces, so a
sampled token is scored by exactly the weights — base and LoRA slots — that :func:`forward`
and :func:`forward_backward` use. Layout (built by :mod:`tx_engine.sampler`): the prompts of
``P`` requests are **left**-padded to a bucketed length ``T``, so every prompt ends at column
``T-1`` and the cache's shared write index is ``T`` for all rows after prefill; decode step ``i`` writes slot ``T+i-1``. The cache has
``S`` slots (bucketed). ``row_src_b`` maps each of the ``B`` decode rows (request × sample) to its
prefill row: a request with ``num_samples = n`` is prefilled once and its cache rows copied ``n``
times. All per-row sampling values are arrays (:class:`RowSamplingParams`), so only ``P``,
``T``, ``B``, ``S`` and the two prompt-logprob flags select a program. Continuous batching
(:mod:`tx_engine.sampling.continuous`) adds :func:`admit` (prefill waiting prompts straight into
finished rows of a running cache, ending just before the shared write slot) and
:func:`shift_cache` (slide every row left when the write slot reaches the end);
:func:`decode_step_topk` is the decode step that also returns per-token top-k logprobs.

Full fine-tuning (:func:`full_train_step`, used by ``tx train`` without ``--lora-rank``)
differentiates the same :func:`_loss` with respect to *all* weights and applies an optax
optimizer, so offline training and the server share one loss implementation.
"""

from __future__ import annotations

from collections import Counter
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import Array

from tx_engine import losses, optim
from tx_engine.layers import lora as lora_lib
from tx_engine.layers.attention import KVCache
from tx_engine.sampling import (
    RowSamplingParams,
    decode_keys,
    sample_tokens,
    token_logprobs,
    topk_logprobs,
)

Batch = dict[str, Any]
State = nnx.State[Any, Any]
TRACE_COUNTS: Counter[str] = Counter()


class StaticGraph:
    """A graphdef whose hash is computed once, to pass as a static argument of the programs.

    Every dispatch of a jitted function hashes its static arguments, and an nnx ``GraphDef``
    hashes its whole node tree each time: ~5 ms for the 2-layer tiny model on a CPU, most of
    the host time of a one-token request. The engine wraps each graphdef once and passes the
    same object, so the cache lookup is one stored hash and an ``is``. The programs accept a
    bare ``GraphDef`` too (:func:`graph_of`).
    """

    __slots__ = ("_hash", "graphdef")

    def __init__(self, graphdef: nnx.GraphDef[Any]) -> None:
        self.graphdef = graphdef
        self._hash = hash(graphdef)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StaticGraph):
            return NotImplemented
        return self.graphdef is other.graphdef or bool(self.graphdef == other.graphdef)


def graph_of(graphdef: nnx.GraphDef[Any] | StaticGraph) -> nnx.GraphDef[Any]:
    """The ``GraphDef`` itself, unwrapped from a :class:`StaticGraph` if need be."""
    return graphdef.graphdef if isinstance(graphdef, StaticGraph) else graphdef


def _loss(
    lora: State,
    graphdef: nnx.GraphDef[Any] | StaticGraph,
    rest: State,
    batch: Batch,
    loss_fn: str,
    logits_chunk: int,
) -> tuple[Array, losses.LossOutputs]:
    """Summed loss over the batch and the per-datum outputs (the ``has_aux`` part)."""
    model: Any = nnx.merge(graph_of(graphdef), lora, rest)
    adapters_b = batch["adapter_indices"]
    hidden_btd = model(
        batch["input_ids"],
        positions_bt=batch["positions"],
        attention_mask_bt=batch["attention_mask"],
        adapter_indices_b=adapters_b,
    )
    target_logprobs = _target_logprobs(
        model, hidden_btd, adapters_b, batch["target_tokens"], logits_chunk
    )
    kernel = losses.get_loss_fn(loss_fn)
    return losses.compute_loss(
        kernel, target_logprobs, batch["inputs"], batch["loss_mask"], batch["config"]
    )


def _target_logprobs(
    model: Any, hidden_btd: Array, adapters_b: Array, targets: Array, logits_chunk: int
) -> Array:
    """Target log-probs, never holding more than ``logits_chunk`` tokens' logits at once.

    ``[B, T, V]`` float32 logits dominate memory for large vocabularies (8k tokens × 152k
    vocab = 5 GB), so time is cut into chunks of ``c = logits_chunk // B`` positions that
    ``lax.map`` visits one by one, each under ``jax.checkpoint`` so the backward pass
    recomputes a chunk's logits instead of storing them all. Falls back to one shot when the
    batch is already small or ``c`` does not divide ``T``.
    """
    b, t = hidden_btd.shape[:2]
    c = max(1, logits_chunk // b)
    if logits_chunk <= 0 or c >= t or t % c:
        logits_btv = model.compute_logits(hidden_btd, adapters_b)
        return losses.target_logprobs_from_logits(logits_btv, targets)
    n = t // c

    def to_chunks(x: Array) -> Array:  # [B, T, ...] -> [n, B, c, ...]
        return jnp.moveaxis(x.reshape(b, n, c, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk(args: tuple[Array, Array]) -> Array:
        h_bcd, tgt = args
        return losses.target_logprobs_from_logits(model.compute_logits(h_bcd, adapters_b), tgt)

    out = jax.lax.map(chunk, (to_chunks(hidden_btd), to_chunks(targets)))
    return jnp.moveaxis(out, 0, 1).reshape(targets.shape)


@partial(jax.jit, static_argnames=("graphdef", "loss_fn", "logits_chunk"))
def forward(
    graphdef: nnx.GraphDef[Any] | StaticGraph,
    lora: State,
    rest: State,
    batch: Batch,
    loss_fn: str,
    logits_chunk: int = 0,
) -> losses.LossOutputs:
    """Loss outputs of ``batch`` without gradients (Tinker ``forward``)."""
    TRACE_COUNTS["forward"] += 1
    _, outputs = _loss(lora, graphdef, rest, batch, loss_fn, logits_chunk)
    return outputs


@partial(
    jax.jit,
    static_argnames=("graphdef", "loss_fn", "logits_chunk", "rank"),
    donate_argnames=("grads",),
)
def forward_backward(
    graphdef: nnx.GraphDef[Any] | StaticGraph,
    lora: State,
    rest: State,
    grads: State,
    batch: Batch,
    loss_fn: str,
    logits_chunk: int = 0,
    rank: int | None = None,
) -> tuple[losses.LossOutputs, State]:
    """Loss outputs and ``grads + ∂(Σ loss)/∂lora`` (the accumulator, donated and returned).

    ``rank`` (≥ the rank bucket ``graphdef`` computes at) differentiates only the first
    ``rank`` rank entries of the factors and adds them into that part of ``grads`` in place:
    the same values (the gradient above the computed rank is exactly zero), without building
    and adding a max-rank, mostly-zero gradient tree per micro-batch. None: all ranks.
    """
    TRACE_COUNTS["forward_backward"] += 1
    grad_fn = jax.grad(_loss, has_aux=True)
    if rank is None:
        new_grads, outputs = grad_fn(lora, graphdef, rest, batch, loss_fn, logits_chunk)
        summed = jax.tree.map(lambda acc, g: acc + g.astype(acc.dtype), grads, new_grads)
        return outputs, summed
    sub = lora_lib.take_slots(lora, None, rank)
    sub_grads, outputs = grad_fn(sub, graphdef, rest, batch, loss_fn, logits_chunk)
    return outputs, lora_lib.put_slots(grads, sub_grads, None, rank, add=True)


@partial(jax.jit, static_argnames=("rank",), donate_argnames=("lora", "opt_state", "grads"))
def apply_update(
    lora: State,
    opt_state: optim.OptState,
    grads: State,
    hyper: optim.AdamHyper,
    step_mask: Array,
    slots: Array,
    rank: int,
) -> tuple[State, optim.OptState, State, optim.StepMetrics]:
    """AdamW on ``slots`` ([U] distinct) where ``step_mask`` ([U] bool) is set; their
    accumulators go to 0. ``hyper`` and the returned metrics are per entry of ``slots``.

    Only the first ``rank`` rank entries of those slots are read and written (``rank`` ≥ the
    rank bucket of every stepped adapter: above an adapter's rank, parameters, gradients and
    moments are zero and AdamW keeps them zero), so a step costs ``U·r``, not ``A·R``. Entries
    of ``slots`` not in the mask, and all other slots, keep params, moments, count and
    accumulated gradients bit-for-bit, so tenants step independently.
    """
    TRACE_COUNTS["apply_update"] += 1

    def take(tree: State) -> State:
        return lora_lib.take_slots(tree, slots, rank)  # type: ignore[no-any-return]

    def put(tree: State, sub: State) -> State:
        return lora_lib.put_slots(tree, sub, slots, rank)  # type: ignore[no-any-return]

    sub_opt = optim.OptState(take(opt_state.m), take(opt_state.v), opt_state.count[slots])
    sub_grads = take(grads)
    new_lora, new_opt, metrics = optim.apply_update(
        take(lora), sub_grads, sub_opt, hyper, step_mask
    )

    def clear(g: Array) -> Array:
        stepped = step_mask.reshape((-1,) + (1,) * (g.ndim - 1))
        return jnp.where(stepped, jnp.zeros_like(g), g)

    opt_out = optim.OptState(
        put(opt_state.m, new_opt.m),
        put(opt_state.v, new_opt.v),
        opt_state.count.at[slots].set(new_opt.count),
    )
    return put(lora, new_lora), opt_out, put(grads, jax.tree.map(clear, sub_grads)), metrics


@jax.jit
def take_slot(tree: Any, slot: Array) -> Any:
    """Every leaf's ``[slot]`` in one dispatch (``slot`` traced: one program for all slots).

    Slicing leaf by leaf dispatched ~100 tiny ops per tree (~30 ms on the small preset), which
    made the worker's per-``optim_step`` recovery snapshot cost more than the step itself.
    """
    TRACE_COUNTS["take_slot"] += 1
    return jax.tree.map(lambda leaf: leaf[slot], tree)


def zeros_like_state(state: State) -> State:
    """A float32 accumulator shaped like ``state`` (the LoRA params)."""
    zeros: State = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), state)
    return zeros


# ----------------------------------------------------------------------------- sampling


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
    cache_len: int,
) -> tuple[Array, KVCache]:  # fmt: skip
    """Left-padded prompts through a fresh ``cache_len``-slot cache: hidden states and cache."""
    cfg = model.config
    cache = KVCache.empty(
        cfg.num_hidden_layers, tokens_pt.shape[0], cache_len, cfg.num_key_value_heads,
        cfg.head_dim, model.dtype,
    )  # fmt: skip
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
    ctx_pcv, next_pc = logits_ptv[:, :-1], tokens_pt[:, 1:]
    scores = PromptScores()
    if scoring.logprobs:
        scores = scores._replace(logprobs_pt=token_logprobs(ctx_pcv, next_pc))
    if scoring.topk:
        ids, lps = topk_logprobs(ctx_pcv, scoring.topk)
        scores = scores._replace(topk_ids_ptk=ids, topk_logprobs_ptk=lps)
    if scoring.target_k:
        assert targets_ptk is not None
        scores = scores._replace(target_ptk=_score_targets(ctx_pcv, targets_ptk))
    if scoring.alt_k:
        assert alt_params_p is not None
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
    prompt_logprobs: bool = False,
    prompt_topk: int = 0,
) -> PrefillOut:
    """Prompts into a fresh ``cache_len``-slot cache, copied to ``row_src_b`` rows; token 0.

    One-shot layout (benchmarks, tests): the prompts are left-padded to ``T``, so the cache's
    write index is ``T`` for every row. The sampler itself uses :func:`admit`.
    """
    TRACE_COUNTS["prefill"] += 1
    model: Any = nnx.merge(graphdef, lora, rest)
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
    graphdef: nnx.GraphDef[Any],
    lora: State,
    rest: State,
    prompts: tuple[Array, Array, Array, Array],
    src_r: Array,
    dst_r: Array,
    params_r: RowSamplingParams,
    prev_tokens_b: Array,
    index: Array,
    cache: KVCache,
    targets_ptk: Array | None = None,
    alt_params_p: RowSamplingParams | None = None,
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
    """
    TRACE_COUNTS["admit"] += 1
    model: Any = nnx.merge(graphdef, lora, rest)
    tokens_pt, positions_pt, mask_pt, adapters_p = prompts
    t = tokens_pt.shape[1]
    hidden_ptd, fresh = _run_prompts(model, tokens_pt, positions_pt, mask_pt, adapters_p, t)
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


@partial(jax.jit, static_argnames=("graphdef", "batch", "cache_len"))
def empty_cache(
    graphdef: nnx.GraphDef[Any], lora: State, rest: State, *, batch: int, cache_len: int
) -> KVCache:
    """A zeroed ``batch × cache_len`` cache for the model (all slots masked, index 0)."""
    TRACE_COUNTS["empty_cache"] += 1
    model: Any = nnx.merge(graphdef, lora, rest)
    cfg = model.config
    return KVCache.empty(
        cfg.num_hidden_layers, batch, cache_len, cfg.num_key_value_heads, cfg.head_dim,
        model.dtype,
    )  # fmt: skip


def _decode_logits(
    model: Any, last_tokens_b: Array, positions_b: Array, adapters_b: Array, cache: KVCache
) -> tuple[Array, KVCache]:
    """One token per row through the decode-specific forward (:mod:`tx_engine.sampling.decode`):
    the same function as the model's cached call, without copying the cache."""
    # Imported here, not at the top: this file's header belongs to the training side's owners.
    from tx_engine.sampling.decode import decode_logits

    return decode_logits(model, last_tokens_b, positions_b, adapters_b, cache)


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
    logits_bv, cache = _decode_logits(model, last_tokens_b, positions_b, adapters_b, cache)
    b = last_tokens_b.shape[0]
    keys = decode_keys(params.key_data, jnp.broadcast_to(step.astype(jnp.uint32), (b,)))
    tokens_b, logprobs_b = sample_tokens(logits_bv, params, keys)
    return logits_bv, tokens_b, logprobs_b, cache


def _decode_step(
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
    """Feed each row's previous token, sample its token ``step`` (keys fold in ``step``).

    ``step`` is a scalar or ``[B]`` (continuous batching: each row its own count). ``cache`` is
    donated: its buffers become the returned cache, so decoding never holds two. Rows that are
    done or free keep decoding harmlessly; the host ignores their output.
    """
    TRACE_COUNTS["decode_step"] += 1
    model: Any = nnx.merge(graphdef, lora, rest)
    _, tokens_b, logprobs_b, cache = _decode_and_sample(
        model, last_tokens_b, positions_b, adapters_b, params, step, cache
    )
    return tokens_b, logprobs_b, cache


def _decode_step_topk(
    graphdef: nnx.GraphDef[Any],
    lora: State,
    rest: State,
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
    model: Any = nnx.merge(graphdef, lora, rest)
    logits_bv, tokens_b, logprobs_b, cache = _decode_and_sample(
        model, last_tokens_b, positions_b, adapters_b, params, step, cache
    )
    ids_bk, lps_bk = topk_logprobs(logits_bv, k, params.temperature)
    return tokens_b, logprobs_b, cache, ids_bk, lps_bk


decode_step = jax.jit(_decode_step, static_argnames=("graphdef",), donate_argnames=("cache",))
decode_step_topk = jax.jit(
    _decode_step_topk, static_argnames=("graphdef", "k"), donate_argnames=("cache",)
)

# (id(graphdef), k) -> (graphdef, program); the graphdef is kept so its id stays its own.
_BOUND_DECODE: dict[tuple[int, int], tuple[Any, Any]] = {}


def bound_decode_step(graphdef: nnx.GraphDef[Any], k: int = 0) -> Any:
    """:func:`decode_step` (``k = 0``) or :func:`decode_step_topk` with ``graphdef`` bound.

    Call it with the remaining arguments (``lora, rest, tokens, positions, adapters, params,
    step, cache``). Why: jit hashes its static arguments on *every* call, and hashing an nnx
    ``GraphDef`` costs milliseconds (~5 ms for an 8-layer model on this CPU) — a quarter of a
    batch-1 decode step. The bound program has no static argument, so a call hashes nothing.
    One compiled program per (graphdef, k), as with the unbound programs.
    """
    hit = _BOUND_DECODE.get((id(graphdef), k))
    if hit is not None and hit[0] is graphdef:
        return hit[1]
    body = partial(_decode_step_topk, k=k) if k else _decode_step
    program = jax.jit(partial(body, graphdef), donate_argnames=("cache",))
    if len(_BOUND_DECODE) >= 64:  # engines come and go (tests); keep the table small
        _BOUND_DECODE.clear()
    _BOUND_DECODE[(id(graphdef), k)] = (graphdef, program)
    return program


# ---------------------------------------------------------------------- full fine-tuning


@partial(
    jax.jit,
    static_argnames=("graphdef", "tx", "logits_chunk"),
    donate_argnames=("params", "opt_state"),
)
def full_train_step(
    graphdef: nnx.GraphDef[Any],
    params: State,
    rest: State,
    opt_state: Any,
    batch: Batch,
    tx: Any,
    logits_chunk: int = 0,
) -> tuple[State, Any, Array]:
    """One optax step on every base weight (`tx train`'s full fine-tuning); returns the loss.

    ``params`` is the middle piece of ``nnx.split(model, nnx.Param, ...)``: LoRA factors are
    :class:`LoRAParam`, not ``nnx.Param``, so they stay frozen in ``rest``. The objective is
    :func:`_loss` with ``cross_entropy`` — the same summed weighted loss that
    :func:`forward_backward` differentiates for an adapter, so full and LoRA fine-tuning
    optimise one number; a caller that wants a per-token mean scales the weights (`tx train`
    divides them by the batch's total weight). ``tx`` is an ``optax.GradientTransformation``
    and static: jit keys on its identity, so a caller keeps one object per run and every step
    reuses the compiled program. ``params`` and ``opt_state`` are donated: a full fine-tune
    must not hold two copies of the weights.
    """
    TRACE_COUNTS["full_train_step"] += 1
    (loss, _), grads = jax.value_and_grad(_loss, has_aux=True)(
        params, graphdef, rest, batch, "cross_entropy", logits_chunk
    )
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)
    return new_params, new_opt_state, loss
