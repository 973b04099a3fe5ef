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
  micro-batches is a plain sum. ``grads`` is donated: its buffer becomes the output.
* :func:`apply_update` — AdamW (:mod:`tx_engine.optim`) on the slots in ``step_mask`` and a
  reset of those slots' accumulators; params, optimizer state and accumulator are donated.

Target log-probs are computed ``logits_chunk`` tokens at a time (static; see
:func:`_target_logprobs`), so ``[B, T, V]`` logits never exist at once. The loss name is static
(each loss is a different program); loss config values and optimizer
hyperparameters are traced arrays, so changing them never recompiles. :data:`TRACE_COUNTS`
counts traces per program — tests use it to prove the absence of recompilation.

Sampling (:func:`prefill`, :func:`decode_step`) uses the same three model pieces, so a
sampled token is scored by exactly the weights — base and LoRA slots — that :func:`forward`
and :func:`forward_backward` use. Layout (built by :mod:`tx_engine.sampler`): the prompts of
``P`` requests are **left**-padded to a bucketed length ``T``, so every prompt ends at column ``T-1`` and the cache's shared write index
is ``T`` for all rows after prefill; decode step ``i`` writes slot ``T+i-1``. The cache has
``S`` slots (bucketed). ``row_src_b`` maps each of the ``B`` decode rows (request × sample) to its
prefill row: a request with ``num_samples = n`` is prefilled once and its cache rows copied ``n``
times. All per-row sampling values are arrays (:class:`RowSamplingParams`), so only ``P``,
``T``, ``B``, ``S`` and the two prompt-logprob flags select a program.
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


def _loss(
    lora: State,
    graphdef: nnx.GraphDef[Any],
    rest: State,
    batch: Batch,
    loss_fn: str,
    logits_chunk: int,
) -> tuple[Array, losses.LossOutputs]:
    """Summed loss over the batch and the per-datum outputs (the ``has_aux`` part)."""
    model: Any = nnx.merge(graphdef, lora, rest)
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
    graphdef: nnx.GraphDef[Any],
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
    jax.jit, static_argnames=("graphdef", "loss_fn", "logits_chunk"), donate_argnames=("grads",)
)
def forward_backward(
    graphdef: nnx.GraphDef[Any],
    lora: State,
    rest: State,
    grads: State,
    batch: Batch,
    loss_fn: str,
    logits_chunk: int = 0,
) -> tuple[losses.LossOutputs, State]:
    """Loss outputs and ``grads + ∂(Σ loss)/∂lora`` (the accumulator, donated and returned)."""
    TRACE_COUNTS["forward_backward"] += 1
    grad_fn = jax.grad(_loss, has_aux=True)
    new_grads, outputs = grad_fn(lora, graphdef, rest, batch, loss_fn, logits_chunk)
    summed = jax.tree.map(lambda acc, g: acc + g.astype(acc.dtype), grads, new_grads)
    return outputs, summed


@partial(jax.jit, donate_argnames=("lora", "opt_state", "grads"))
def apply_update(
    lora: State,
    opt_state: optim.OptState,
    grads: State,
    hyper: optim.AdamHyper,
    step_mask: Array,
) -> tuple[State, optim.OptState, State, optim.StepMetrics]:
    """AdamW on the slots where ``step_mask`` ([A] bool) is set; their accumulators go to 0.

    Slots not in the mask keep params, moments, count and accumulated gradients bit-for-bit,
    so tenants step independently even though they share one set of arrays.
    """
    TRACE_COUNTS["apply_update"] += 1
    new_lora, new_opt, metrics = optim.apply_update(lora, grads, opt_state, hyper, step_mask)

    def clear(g: Array) -> Array:
        stepped = step_mask.reshape((-1,) + (1,) * (g.ndim - 1))
        return jnp.where(stepped, jnp.zeros_like(g), g)

    return new_lora, new_opt, jax.tree.map(clear, grads), metrics


def zeros_like_state(state: State) -> State:
    """A float32 accumulator shaped like ``state`` (the LoRA params)."""
    zeros: State = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), state)
    return zeros


# ----------------------------------------------------------------------------- sampling


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
