"""Multi-tenant LoRA: every projection carries the factors of *all* adapter slots.

Formula, for batch row ``i`` with adapter slot ``s = adapter_indices_b[i]``::

    y = x·W + scaling[s] · (x·A[s])·B[s]        scaling[s] = alpha / rank   (0 for a free slot)

with ``A = lora_a [A, D_in, R]`` and ``B = lora_b [A, R, D_out]`` (the leading axis is the
adapter slot, R the *maximum* rank). MoE experts carry one factor pair per expert:
``lora_a [A, E, D_in, R]``, ``lora_b [A, E, R, D_out]``.

Grouping rows per adapter: dense projections **gather** each row's factors
(``lora_a[adapter_indices_b]`` → ``[B, D_in, R]``) and run two batched einsums; this needs no
sorting and costs ``B·(D_in+D_out)·R`` extra memory, small next to activations. Expert
projections already sort tokens for ``jax.lax.ragged_dot``; they sort by ``(expert, adapter)``
so the same ragged matmul applies the LoRA factors of each (expert, adapter) group.

Types: factors are :class:`LoRAParam` (trainable; select them with
``nnx.state(model, LoRAParam)``), scalings :class:`LoRAScaling` (not trainable). Each
projection holds them in a :class:`LoRAFactors` child named ``lora`` whose ``group`` says which
target flag selects it.

Slots: slot :data:`BASE_SLOT` (0) is reserved for "no adapter" and always has scaling 0, so
base-model rows simply use index 0 and mixed batches need no mask. ``A`` (``max_lora_adapters``
of ``load_model``) counts this base slot. Slots ``1..A-1`` are
allocated by the caller (the engine keeps the slot table) with :func:`init_adapter`:
``A`` is drawn like HF PEFT's default (kaiming-uniform, ``U(-1/√D_in, 1/√D_in)``) from a seeded
key, ``B`` is zero (so a fresh adapter reproduces the base model exactly), columns of ``A`` and
rows of ``B`` above the tenant's rank are zero. Those stay zero under training: their gradients
are exactly zero (``∂/∂A[:, r:] ∝ B[r:]ᵀ = 0`` and ``∂/∂B[r:] ∝ (x·A[:, r:])ᵀ = 0``), so a
rank-r adapter in a max-rank slot is an exact rank-r LoRA. Target flags select modules by the
group each LoRA module declares: ``train_attn`` → q/k/v/o_proj, ``train_mlp`` → gate/up/down_proj
(dense and every expert), ``train_unembed`` → lm_head; an untargeted module gets scaling 0 in
that slot (its zero factors never matter). :func:`clear_adapter` zeros factors and scaling.

Cost: every slot is padded to the max rank, so a rank-8 tenant costs exactly what a rank-64 one
does when ``R=64`` — memory ``A·(D_in+D_out)·R`` per projection and ``2·T·(D_in+D_out)·R`` FLOPs
per row — i.e. 8× its need. Choose ``max_lora_rank`` near the ranks actually served; a later
rank-bucketed ``ragged_dot`` can remove the padding without changing this interface.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from tx_engine.errors import AdapterError

BASE_SLOT = 0
LoRAGroup = Literal["attn", "mlp", "unembed"]


class LoRAParam(nnx.Variable[jax.Array]):
    """Trainable LoRA factor (``lora_a`` / ``lora_b``); select trainable state by this type."""


class LoRAScaling(nnx.Variable[jax.Array]):
    """Per-slot ``alpha/rank`` (0 = slot off). Not trainable: set only by slot functions."""


class LoRAFactors(nnx.Module):
    """The LoRA state of one projection; ``prefix`` is ``()`` or ``(E,)`` for experts."""

    def __init__(
        self,
        prefix: tuple[int, ...],
        d_in: int,
        d_out: int,
        *,
        max_adapters: int,
        max_rank: int,
        group: LoRAGroup,
        axes: tuple[tuple[str | None, ...], str | None, str | None],
    ) -> None:
        prefix_axes, in_axis, out_axis = axes
        self.group: LoRAGroup = group
        self.d_in = d_in
        a_shape = (max_adapters, *prefix, d_in, max_rank)
        b_shape = (max_adapters, *prefix, max_rank, d_out)
        self.lora_a = LoRAParam(
            jnp.zeros(a_shape, jnp.float32),
            logical_axes=("adapters", *prefix_axes, in_axis, "lora_rank"),
        )
        self.lora_b = LoRAParam(
            jnp.zeros(b_shape, jnp.float32),
            logical_axes=("adapters", *prefix_axes, "lora_rank", out_axis),
        )
        self.lora_scaling = LoRAScaling(
            jnp.zeros((max_adapters,), jnp.float32), logical_axes=("adapters",)
        )

    def delta(self, x_btd: jax.Array, adapter_indices_b: jax.Array) -> jax.Array:
        """``scaling[s]·(x·A[s])·B[s]`` per row (dense projections only), in ``x``'s dtype."""
        a_bdr = self.lora_a[...][adapter_indices_b].astype(x_btd.dtype)
        b_brf = self.lora_b[...][adapter_indices_b].astype(x_btd.dtype)
        s_b = self.lora_scaling[...][adapter_indices_b]
        f32 = jnp.float32  # accumulate in float32 even for bfloat16 activations
        xa_btr = jnp.einsum("btd,bdr->btr", x_btd, a_bdr, preferred_element_type=f32)
        xa_btr = (xa_btr * s_b[:, None, None]).astype(x_btd.dtype)
        return jnp.einsum("btr,brf->btf", xa_btr, b_brf, preferred_element_type=f32).astype(
            x_btd.dtype
        )


def lora_modules(model: nnx.Module) -> Iterator[tuple[tuple[object, ...], LoRAFactors]]:
    """Every LoRA-carrying submodule with its path, in a deterministic order."""
    for path, module in nnx.iter_modules(model):
        if isinstance(module, LoRAFactors):
            yield path, module


def _check_slot(module: LoRAFactors, slot: int) -> None:
    n_slots = module.lora_scaling.shape[0]
    if not 1 <= slot < n_slots:
        raise AdapterError(f"slot must be in [1, {n_slots - 1}] (0 is the base model), got {slot}")


def init_adapter(
    model: nnx.Module,
    slot: int,
    *,
    rank: int,
    alpha: float,
    seed: int,
    train_attn: bool = True,
    train_mlp: bool = True,
    train_unembed: bool = False,
) -> None:
    """(Re)initialise ``slot`` as a fresh rank-``rank`` adapter: A kaiming-uniform, B zero.

    Values are computed functionally (``.at[slot].set``) and written back into the model's
    variables, so the function is safe to call between jitted steps and deterministic in
    ``seed``.
    """
    if alpha <= 0:
        raise AdapterError(f"alpha must be > 0, got {alpha}")
    targets = {"attn": train_attn, "mlp": train_mlp, "unembed": train_unembed}
    key = jax.random.key(seed)
    for i, (_, mod) in enumerate(lora_modules(model)):
        _check_slot(mod, slot)
        max_rank = mod.lora_a.shape[-1]
        if not 1 <= rank <= max_rank:
            raise AdapterError(f"rank must be in [1, {max_rank}] (max_lora_rank), got {rank}")
        on = targets[mod.group]
        a_shape = mod.lora_a.shape[1:]
        bound = 1.0 / (mod.d_in**0.5)
        a = jax.random.uniform(jax.random.fold_in(key, i), a_shape, jnp.float32, -bound, bound)
        a = jnp.where(jnp.arange(max_rank) < rank, a, 0.0) if on else jnp.zeros(a_shape)
        mod.lora_a[...] = mod.lora_a[...].at[slot].set(a.astype(mod.lora_a.dtype))
        mod.lora_b[...] = mod.lora_b[...].at[slot].set(0)
        scale = alpha / rank if on else 0.0
        mod.lora_scaling[...] = mod.lora_scaling[...].at[slot].set(scale)


def clear_adapter(model: nnx.Module, slot: int) -> None:
    """Free ``slot``: zero its factors and scaling so it reproduces the base model."""
    for _, mod in lora_modules(model):
        _check_slot(mod, slot)
        mod.lora_a[...] = mod.lora_a[...].at[slot].set(0)
        mod.lora_b[...] = mod.lora_b[...].at[slot].set(0)
        mod.lora_scaling[...] = mod.lora_scaling[...].at[slot].set(0)
