"""Grouped-query attention with rope, optional q/k RMSNorm (Qwen3) and an optional KV cache.

Masking: a query at time ``t`` sees key ``j`` iff ``j <= t`` (causal by *index*, so left padding
works) and key ``j`` is a real token (``attention_mask``). Positions for rope come separately
(``positions_bt``), so padded rows can start at position 0 after their padding.

KV cache (for a sampler): :class:`KVCache` holds ``[L, B, S, K, H]`` keys/values, a key mask
``[B, S]`` and a write index shared by all rows. A call with ``T`` new tokens writes slots
``index..index+T-1``, attends over all ``S`` slots with the causal rule in slot coordinates,
and advances ``index`` by ``T``. Prefill and decode are the same code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tx_engine.layers.linear import LoRALinear, LoRASpec
from tx_engine.layers.norm import RMSNorm
from tx_engine.layers.rope import apply_rope


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class KVCache:
    """Per-model cache: ``k_lbskh``/``v_lbskh`` ``[L,B,S,K,H]``, ``mask_bs`` bool, ``index`` int32."""

    k_lbskh: jax.Array
    v_lbskh: jax.Array
    mask_bs: jax.Array
    index: jax.Array

    @staticmethod
    def empty(
        num_layers: int, batch: int, size: int, kv_heads: int, head_dim: int, dtype: jnp.dtype
    ) -> KVCache:
        shape = (num_layers, batch, size, kv_heads, head_dim)
        return KVCache(
            k_lbskh=jnp.zeros(shape, dtype),
            v_lbskh=jnp.zeros(shape, dtype),
            mask_bs=jnp.zeros((batch, size), bool),
            index=jnp.zeros((), jnp.int32),
        )


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class LayerKV:
    """One layer's cache view handed to attention: keys, values, key mask and write index."""

    k_bskh: jax.Array
    v_bskh: jax.Array
    mask_bs: jax.Array
    index: jax.Array


def attention_mask_btS(mask_bs: jax.Array, q_start: jax.Array | int, t: int) -> jax.Array:
    """Bool ``[B, T, S]``: key slot ``s`` visible from query ``t`` (slot ``q_start+t``)."""
    s = mask_bs.shape[1]
    causal_ts = jnp.arange(s)[None, :] <= (q_start + jnp.arange(t))[:, None]
    return causal_ts[None] & mask_bs[:, None, :]


class Attention(nnx.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        qk_norm_eps: float | None,
        use_bias: bool,
        lora: LoRASpec,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ) -> None:
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} not a multiple of kv heads {num_kv_heads}")
        self.n, self.k, self.h = num_heads, num_kv_heads, head_dim
        self.dtype = dtype
        kw: dict[str, Any] = {
            "lora": lora,
            "dtype": dtype,
            "param_dtype": param_dtype,
            "rngs": rngs,
        }
        self.q_proj = LoRALinear(dim, num_heads * head_dim, axes=("embed", "heads"), group="attn", use_bias=use_bias, **kw)  # fmt: skip
        self.k_proj = LoRALinear(dim, num_kv_heads * head_dim, axes=("embed", "kv_heads"), group="attn", use_bias=use_bias, **kw)  # fmt: skip
        self.v_proj = LoRALinear(dim, num_kv_heads * head_dim, axes=("embed", "kv_heads"), group="attn", use_bias=use_bias, **kw)  # fmt: skip
        self.o_proj = LoRALinear(num_heads * head_dim, dim, axes=("heads", "embed"), group="attn", **kw)  # fmt: skip
        if qk_norm_eps is not None:
            nkw: dict[str, Any] = {
                "eps": qk_norm_eps,
                "dtype": dtype,
                "param_dtype": param_dtype,
                "rngs": rngs,
            }
            self.q_norm: RMSNorm | None = RMSNorm(head_dim, **nkw)
            self.k_norm: RMSNorm | None = RMSNorm(head_dim, **nkw)
        else:
            self.q_norm = self.k_norm = None

    def __call__(
        self,
        x_btd: jax.Array,
        cos_sin: tuple[jax.Array, jax.Array],
        mask_bt: jax.Array,
        adapter_indices_b: jax.Array,
        kv: LayerKV | None = None,
    ) -> tuple[jax.Array, LayerKV | None]:
        b, t, _ = x_btd.shape
        q_btnh = self.q_proj(x_btd, adapter_indices_b).reshape(b, t, self.n, self.h)
        k_btkh = self.k_proj(x_btd, adapter_indices_b).reshape(b, t, self.k, self.h)
        v_btkh = self.v_proj(x_btd, adapter_indices_b).reshape(b, t, self.k, self.h)
        if self.q_norm is not None and self.k_norm is not None:
            q_btnh, k_btkh = self.q_norm(q_btnh), self.k_norm(k_btkh)
        q_btnh = apply_rope(q_btnh, *cos_sin)
        k_btkh = apply_rope(k_btkh, *cos_sin)
        if kv is None:
            keys, values, visible_btS = k_btkh, v_btkh, attention_mask_btS(mask_bt, 0, t)
        else:
            kv = _write_kv(kv, k_btkh, v_btkh, mask_bt)
            keys, values = kv.k_bskh, kv.v_bskh
            visible_btS = attention_mask_btS(kv.mask_bs, kv.index, t)
            kv = LayerKV(kv.k_bskh, kv.v_bskh, kv.mask_bs, kv.index + t)
        out_btnh = self._attend(q_btnh, keys, values, visible_btS, causal_blocks=kv is None)
        return self.o_proj(out_btnh.reshape(b, t, self.n * self.h), adapter_indices_b), kv

    def _attend(
        self,
        q_btnh: jax.Array,
        k_bskh: jax.Array,
        v_bskh: jax.Array,
        visible_btS: jax.Array,
        causal_blocks: bool = False,
    ) -> jax.Array:
        """Softmax attention in float32; GQA by viewing the N query heads as K groups of N/K.

        ``causal_blocks`` (queries at key slots ``0..T-1``, no cache: training and scoring)
        cuts long sequences into query blocks of ``c`` rows (:func:`query_block`); block ``i``
        attends to keys ``[0, (i+1)·c)`` only, since later keys are causally masked anyway.
        That skips the masked upper triangle (``(n-1)/2n`` of the score work for ``n``
        blocks) and, with each block rematerialised in the backward pass, never stores the
        ``[B, H, T, T]`` float32 probabilities: at ``T = 512`` they were ~1/4 of a training
        step's memory. Same values: masked keys add ``exp(finfo.min - max) = 0`` to a row.
        """
        attend = partial(_attend_block, n=self.n, k=self.k, h=self.h, dtype=self.dtype)
        t, s = q_btnh.shape[1], k_bskh.shape[1]
        c = query_block(t) if causal_blocks and s == t else 0
        if not c:
            return attend(q_btnh, k_bskh, v_bskh, visible_btS)
        block = jax.checkpoint(attend)
        outs = [
            block(q_btnh[:, i : i + c], k_bskh[:, : i + c], v_bskh[:, : i + c],
                  visible_btS[:, i : i + c, : i + c])
            for i in range(0, t, c)
        ]  # fmt: skip
        return jnp.concatenate(outs, axis=1)


QUERY_BLOCK = 128  # rows per query block; below 2 blocks the full square is as cheap
MAX_QUERY_BLOCKS = 16  # blocks are unrolled: bound the program size for very long sequences


def query_block(t: int) -> int:
    """Query-block size for causal attention over ``t`` tokens, 0 for "one block"."""
    c = max(QUERY_BLOCK, -(-t // MAX_QUERY_BLOCKS))
    return c if t >= 2 * c and t % c == 0 else 0


def _attend_block(
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    visible_btS: jax.Array,
    *,
    n: int,
    k: int,
    h: int,
    dtype: jnp.dtype,
) -> jax.Array:
    """``softmax(q·kᵀ/√h, masked)·v`` for one block of queries (float32 scores)."""
    b, t, _, _ = q_btnh.shape
    q_btkgh = q_btnh.reshape(b, t, k, n // k, h)
    f32 = jnp.float32
    scores = jnp.einsum(
        "btkgh,bskh->bkgts", q_btkgh, k_bskh.astype(dtype), preferred_element_type=f32
    )
    scores = scores * (h**-0.5)
    # finfo.min, not -inf: a fully padded query row gives a uniform softmax instead of NaN.
    scores = jnp.where(visible_btS[:, None, None], scores, float(np.finfo(np.float32).min))
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_bskh.astype(dtype), preferred_element_type=f32)
    return out.astype(dtype).reshape(b, t, n, h)


def _write_kv(kv: LayerKV, k_btkh: jax.Array, v_btkh: jax.Array, mask_bt: jax.Array) -> LayerKV:
    """Write the new tokens at ``index`` for every row."""
    start = (0, kv.index, 0, 0)
    k = jax.lax.dynamic_update_slice(kv.k_bskh, k_btkh.astype(kv.k_bskh.dtype), start)
    v = jax.lax.dynamic_update_slice(kv.v_bskh, v_btkh.astype(kv.v_bskh.dtype), start)
    m = jax.lax.dynamic_update_slice(kv.mask_bs, mask_bt.astype(bool), (0, kv.index))
    return LayerKV(k, v, m, kv.index)
