"""The decode step's forward pass, written for one token per row on a donated KV cache.

A decode step is memory-bound: it should read every weight and the live cache once. The
generic model call (:class:`tx_engine.models.llama.LlamaModel` with a :class:`KVCache`) is built
for prefill and training: each layer slices its ``[B, S, K, H]`` keys/values out of the
``[L, B, S, K, H]`` cache, writes the new token into the slice and the layers' slices are
stacked back. XLA:CPU materialises every slice (they feed dots) and the stack, so a step copied
the whole cache about twice on one thread — the largest cost at batch 64 after sampling.

:func:`decode_logits` computes the same function with the same submodules (norms, projections
with their LoRA, rope, MLP / MoE, ``lm_head``) and the same attention contractions, but writes
each layer's new key/value straight into the full cache buffer (``dynamic_update_slice`` at
``(layer, 0, index)``: in place, since the cache is donated) and returns that buffer, so the
per-layer stack disappears; the attention dots still read a slice of it. Measured on 2 CPU
cores (small preset, interleaved A/B): 1.2x at batch 4, 1.7x at batch 64 (S = 64) and at
batch 16 with S = 1024. A multiply-and-reduce attention (no dot, no slice copy) was tried and
was 1.7x *slower* at S = 1024: XLA:CPU's reduction over the head dim does not vectorise.

Base-model batches skip LoRA: every projection (and dense ``MLP``) is called with
``lora_on`` = "some row has an adapter", which puts its LoRA term behind a ``lax.cond`` (a
device value: no new program, no recompile; see ``LoRALinear.__call__``). Slot 0 (base)
has zero factors and scaling, so its term is exactly ``+0.0`` and skipping it changes no bit.
MoE blocks are called as they are. The tied ``lm_head``'s term was the costly one: ~4 ms of a
~15 ms batch-1 step (small preset), mostly the per-row gather of ``[r, V]`` factors and an
extra pass over the ``[B, V]`` logits.

Results equal the model's cached call up to float32 summation order inside fusions (~1e-6
on logits; tests check 1e-5).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from tx_engine.layers.attention import Attention, KVCache
from tx_engine.layers.lora import BASE_SLOT
from tx_engine.layers.mlp import MLP
from tx_engine.layers.rope import apply_rope, rope_cos_sin, rope_inv_freq
from tx_engine.models.llama import LlamaForCausalLM

__all__ = ["decode_logits"]


def decode_logits(
    model: Any, tokens_b: Array, positions_b: Array, adapters_b: Array, cache: KVCache
) -> tuple[Array, KVCache]:
    """Logits ``[B, V]`` (float32) of one new token per row, and the cache with it written.

    Same contract as calling the model with ``T = 1`` and ``kv_cache=cache``: the token is
    written at the shared ``cache.index`` (mask set), attends to slots ``<= index`` that are
    unmasked, and the index advances by one.
    """
    if not isinstance(model, LlamaForCausalLM):  # a model family this fast path does not know
        return _generic_logits(model, tokens_b, positions_b, adapters_b, cache)
    adapters_b = adapters_b.astype(jnp.int32)
    body, cfg = model.model, model.model.cfg
    b, s = tokens_b.shape[0], cache.mask_bs.shape[1]
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_dict)
    cos_sin = rope_cos_sin(positions_b[:, None], inv_freq)
    index = cache.index
    mask_bs = jax.lax.dynamic_update_slice(cache.mask_bs, jnp.ones((b, 1), bool), (0, index))
    visible_bs = (jnp.arange(s)[None, :] <= index) & mask_bs
    k_all, v_all = cache.k_lbskh, cache.v_lbskh
    lora_on = jnp.any(adapters_b != BASE_SLOT)
    h_b1d = body.embed_tokens(tokens_b[:, None])
    for layer_idx, layer in enumerate(body.layers):
        attn = layer.self_attn
        x_b1d = layer.input_layernorm(h_b1d)
        q_bnh, k_bkh, v_bkh = _qkv(attn, x_b1d, cos_sin, adapters_b, lora_on)
        at = (layer_idx, 0, index, 0, 0)
        k_all = jax.lax.dynamic_update_slice(k_all, k_bkh[None, :, None].astype(k_all.dtype), at)
        v_all = jax.lax.dynamic_update_slice(v_all, v_bkh[None, :, None].astype(v_all.dtype), at)
        out_bnh = _attend(attn, q_bnh, k_all[layer_idx], v_all[layer_idx], visible_bs)
        h_b1d = h_b1d + attn.o_proj(out_bnh.reshape(b, 1, -1), adapters_b, lora_on=lora_on)
        x_b1d = layer.post_attention_layernorm(h_b1d)
        if isinstance(layer.mlp, MLP):
            h_b1d = h_b1d + layer.mlp(x_b1d, adapters_b, lora_on=lora_on)
        else:  # MoE: its own call
            h_b1d = h_b1d + layer.mlp(x_b1d, adapters_b)
    # LlamaForCausalLM.compute_logits, with the LoRA term behind the same switch.
    tied = body.embed_tokens.weight[...].T if model.config.tie_word_embeddings else None
    hidden_b1d = body.norm(h_b1d)
    logits_b1v = model.lm_head(hidden_b1d, adapters_b, weight_df=tied, lora_on=lora_on)
    return logits_b1v[:, 0].astype(jnp.float32), KVCache(k_all, v_all, mask_bs, index + 1)


def _qkv(
    attn: Attention, x_b1d: Array, cos_sin: tuple[Array, Array], adapters_b: Array, lora_on: Array
) -> tuple[Array, Array, Array]:
    """Rotated queries ``[B, N, H]`` and keys, values ``[B, K, H]`` (Attention's own steps)."""
    b = x_b1d.shape[0]
    q = attn.q_proj(x_b1d, adapters_b, lora_on=lora_on).reshape(b, 1, attn.n, attn.h)
    k = attn.k_proj(x_b1d, adapters_b, lora_on=lora_on).reshape(b, 1, attn.k, attn.h)
    v = attn.v_proj(x_b1d, adapters_b, lora_on=lora_on).reshape(b, 1, attn.k, attn.h)
    if attn.q_norm is not None and attn.k_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    return apply_rope(q, *cos_sin)[:, 0], apply_rope(k, *cos_sin)[:, 0], v[:, 0]


def _attend(
    attn: Attention, q_bnh: Array, k_bskh: Array, v_bskh: Array, visible_bs: Array
) -> Array:
    """:meth:`Attention._attend` for one query per row: the same contractions, float32."""
    b, f32, dt = q_bnh.shape[0], jnp.float32, attn.dtype
    q_bkgh = q_bnh.reshape(b, attn.k, attn.n // attn.k, attn.h)
    scores = jnp.einsum("bkgh,bskh->bkgs", q_bkgh, k_bskh.astype(dt), preferred_element_type=f32)
    scores = scores * (attn.h**-0.5)
    scores = jnp.where(visible_bs[:, None, None], scores, float(np.finfo(np.float32).min))
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    out = jnp.einsum("bkgs,bskh->bkgh", probs, v_bskh.astype(dt), preferred_element_type=f32)
    return out.astype(dt).reshape(b, attn.n, attn.h)


def _generic_logits(
    model: Any, tokens_b: Array, positions_b: Array, adapters_b: Array, cache: KVCache
) -> tuple[Array, KVCache]:
    """The model's own cached call with ``T = 1``."""
    b = tokens_b.shape[0]
    hidden_b1d, cache = model(
        tokens_b[:, None],
        positions_bt=positions_b[:, None],
        attention_mask_bt=jnp.ones((b, 1), bool),
        adapter_indices_b=adapters_b,
        kv_cache=cache,
    )
    return model.compute_logits(hidden_b1d, adapters_b)[:, 0], cache
