"""Sparse mixture-of-experts block (Qwen3-MoE): softmax router, top-k, grouped expert matmuls.

Routing: ``p = softmax(x·W_router)`` in float32, take the top ``k`` experts per token, optionally
renormalise their weights to sum to 1 (``norm_topk_prob``). The ``B·T·k`` (token, expert) pairs
are sorted by ``expert·A + adapter`` so that

* the base expert matmuls are one ``jax.lax.ragged_dot`` over expert groups (sizes summed over
  adapters), never a dense all-experts compute, and
* the LoRA factors of every (expert, adapter) pair are applied by a second ``ragged_dot`` over
  the finer groups, with factors viewed as ``[E·A, D_in, r]`` — ``r`` the batch's rank bucket
  (:attr:`~tx_engine.layers.lora.LoRAFactors.active_rank`), not the maximum rank.

Outputs are weighted by the router weights and scattered back with a segment sum. Padding
tokens are routed like any other (their outputs are never read); masking them out of routing
would change only throughput, not results.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tx_engine.layers.common import default_kernel_init, make_param
from tx_engine.layers.linear import LoRASpec
from tx_engine.layers.lora import LoRAFactors


class Router(nnx.Module):
    """``mlp.gate`` of HF: a bias-free ``[D, E]`` projection (no LoRA: routing stays shared)."""

    def __init__(self, dim: int, experts: int, *, param_dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        self.weight = make_param(
            rngs, default_kernel_init(), (dim, experts), param_dtype, ("embed", None), "linear"
        )


class ExpertProj(nnx.Module):
    """One stacked expert projection ``weight [E, D_in, D_out]`` with per-expert LoRA."""

    def __init__(
        self,
        experts: int,
        d_in: int,
        d_out: int,
        *,
        axes: tuple[str, str],
        lora: LoRASpec,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ) -> None:
        self.weight = make_param(
            rngs,
            default_kernel_init(),
            (experts, d_in, d_out),
            param_dtype,
            ("experts", *axes),
            "experts",
        )
        self.lora = LoRAFactors(
            (experts,),
            d_in,
            d_out,
            max_adapters=lora.num_slots,
            max_rank=lora.max_rank,
            group="mlp",
            axes=(("experts",), axes[0], axes[1]),
        )

    def __call__(
        self, x_nd: jax.Array, a_n: jax.Array, sizes_e: jax.Array, sizes_g: jax.Array
    ) -> jax.Array:
        """``x_nd`` sorted by (expert, adapter); ``sizes_e`` per expert, ``sizes_g`` per pair."""
        f32, dt = jnp.float32, x_nd.dtype  # accumulate in float32 even for bfloat16
        w_edf = self.weight[...].astype(dt)
        y_nf = jax.lax.ragged_dot(x_nd, w_edf, sizes_e, preferred_element_type=f32).astype(dt)
        if not self.lora.active_rank:  # a batch without adapter rows (rank bucket 0)
            return y_nf
        a_aedr, b_aerf = self.lora.factors()  # cut to the batch's rank bucket
        n_a, n_e = a_aedr.shape[:2]
        a_gdr = jnp.swapaxes(a_aedr, 0, 1).reshape(n_e * n_a, *a_aedr.shape[2:])
        b_grf = jnp.swapaxes(b_aerf, 0, 1).reshape(n_e * n_a, *b_aerf.shape[2:])
        s_n = self.lora.lora_scaling[...][a_n]
        xa_nr = jax.lax.ragged_dot(x_nd, a_gdr.astype(dt), sizes_g, preferred_element_type=f32)
        xa_nr = (xa_nr * s_n[:, None]).astype(dt)
        delta = jax.lax.ragged_dot(xa_nr, b_grf.astype(dt), sizes_g, preferred_element_type=f32)
        return y_nf + delta.astype(dt)


class SparseMoE(nnx.Module):
    """HF ``Qwen3MoeSparseMoeBlock``: attribute names ``gate`` (router) and ``experts``."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        experts: int,
        top_k: int,
        *,
        norm_topk_prob: bool,
        lora: LoRASpec,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ) -> None:
        self.top_k, self.num_experts, self.norm_topk_prob = top_k, experts, norm_topk_prob
        self.dtype = dtype
        self.gate = Router(dim, experts, param_dtype=param_dtype, rngs=rngs)
        kw: dict[str, Any] = {"lora": lora, "param_dtype": param_dtype, "rngs": rngs}
        self.experts = nnx.Dict(
            gate_proj=ExpertProj(experts, dim, hidden, axes=("embed", "mlp"), **kw),
            up_proj=ExpertProj(experts, dim, hidden, axes=("embed", "mlp"), **kw),
            down_proj=ExpertProj(experts, hidden, dim, axes=("mlp", "embed"), **kw),
        )

    def route(self, x_md: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Top-k weights ``[M, k]`` (activation dtype) and expert ids ``[M, k]``."""
        w_de = self.gate.weight[...].astype(self.dtype)
        logits_me = jnp.einsum("md,de->me", x_md, w_de, preferred_element_type=jnp.float32)
        # HF rounds router logits to the activation dtype before its float32 softmax.
        probs_me = jax.nn.softmax(logits_me.astype(self.dtype).astype(jnp.float32), axis=-1)
        weights_mk, experts_mk = jax.lax.top_k(probs_me, self.top_k)
        if self.norm_topk_prob:
            weights_mk = weights_mk / jnp.sum(weights_mk, axis=-1, keepdims=True)
        return weights_mk.astype(self.dtype), experts_mk

    def __call__(self, x_btd: jax.Array, adapter_indices_b: jax.Array) -> jax.Array:
        b, t, d = x_btd.shape
        x_md = x_btd.astype(self.dtype).reshape(b * t, d)
        weights_mk, experts_mk = self.route(x_md)
        n_slots = self.experts["gate_proj"].lora.lora_scaling.shape[0]
        e_n = experts_mk.reshape(-1)
        tok_n = jnp.repeat(jnp.arange(b * t), self.top_k)
        a_n = jnp.repeat(adapter_indices_b.astype(jnp.int32), t * self.top_k)
        group_n = e_n * n_slots + a_n
        order = jnp.argsort(group_n, stable=True)
        tok_sorted, a_sorted = tok_n[order], a_n[order]
        sizes_g = jnp.bincount(group_n, length=self.num_experts * n_slots).astype(jnp.int32)
        sizes_e = sizes_g.reshape(self.num_experts, n_slots).sum(axis=1)
        xs_nd = x_md[tok_sorted]
        args = (a_sorted, sizes_e, sizes_g)
        gate_nf = self.experts["gate_proj"](xs_nd, *args)
        up_nf = self.experts["up_proj"](xs_nd, *args)
        out_nd = self.experts["down_proj"](jax.nn.silu(gate_nf) * up_nf, *args)
        out_nd = out_nd * weights_mk.reshape(-1)[order][:, None]
        y_md = jax.ops.segment_sum(out_nd, tok_sorted, num_segments=b * t)
        return y_md.reshape(b, t, d)
