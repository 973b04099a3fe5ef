"""Adapter-slot bookkeeping as compiled programs: one dispatch per create, free or load.

Why: creating, freeing or loading an adapter writes one slot of every LoRA factor, scaling,
optimizer moment and gradient. Done eagerly (``leaf.at[slot].set(...)`` per leaf on a merged
model) that was ~500 scatters of ~0.6 ms of host time each: ~230 ms to create or free an
adapter and ~380 ms to load one on the small preset (60 and 100 ms on the tiny one). A server
pays that for every sampler checkpoint it loads (each RL iteration's
``save_weights_and_get_sampling_client``), the sampler it evicts for it, and every run it
creates or parks. Here each is one jitted program over the engine's flat leaves, with the slot,
seed, rank and scalings as traced arguments, so it compiles once per engine: create, free and
load now take 55, 27 and 53 ms on the small preset and 5, 2 and 6 ms on the tiny one
(``max_lora_adapters=4``, rank 32, until every written array is ready; what is left on small
is mostly copying every slot's factors and moments, since nothing is donated). A load writes
the checkpoint's values directly (:meth:`TrainingEngine._install_slot`): it draws no ``A``.

The programs take and return only the leaves they write: the LoRA factors (the engine's
``lora`` state), the scaling of each LoRA module (leaves of its ``rest`` state, found through
:class:`SlotLayout`), optimizer moments and gradients. The base weights never cross the call:
a jit output is a new buffer even when returned unchanged, so passing ``rest`` through would
copy the whole model. Nothing is donated: a sampling run or a queued recovery snapshot may
still read the previous arrays.

:func:`fresh_adapter` draws exactly what :func:`tx_engine.layers.lora.init_adapter` draws
(per module ``i`` in :func:`~tx_engine.layers.lora.lora_modules` order, ``A`` from
``fold_in(key(seed), i)``), so a seed means the same adapter on either path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tx_engine.layers import lora as lora_lib

__all__ = ["SlotLayout", "fresh_adapter", "set_slot", "zero_slot"]

Leaves = tuple[jax.Array, ...]


@dataclass(frozen=True)
class SlotLayout:
    """Where each LoRA module's leaves sit in the engine's flat states, in
    :func:`~tx_engine.layers.lora.lora_modules` order (static: hashed by the programs)."""

    a: tuple[int, ...]
    """Index of each module's ``lora_a`` among the ``lora`` state's leaves."""
    b: tuple[int, ...]
    """Index of each module's ``lora_b`` among the ``lora`` state's leaves."""
    scaling: tuple[int, ...]
    """Index of each module's ``lora_scaling`` among the ``rest`` state's leaves."""
    groups: tuple[str, ...]
    """Each module's target group (``attn``, ``mlp`` or ``unembed``)."""
    bounds: tuple[float, ...]
    """Each module's kaiming-uniform bound for ``A`` (``1/sqrt(d_in)``)."""

    @classmethod
    def of(cls, model: nnx.Module, lora: Any, rest: Any) -> SlotLayout:
        """The layout of the states ``lora`` / ``rest`` as split from ``model``."""
        lora_index: dict[tuple[Any, ...], int] = {
            tuple(path): i for i, (path, _) in enumerate(nnx.to_flat_state(lora))
        }
        rest_index: dict[tuple[Any, ...], int] = {
            tuple(path): i for i, (path, _) in enumerate(nnx.to_flat_state(rest))
        }
        modules = list(lora_lib.lora_modules(model))
        return cls(
            a=tuple(lora_index[(*path, "lora_a")] for path, _ in modules),
            b=tuple(lora_index[(*path, "lora_b")] for path, _ in modules),
            scaling=tuple(rest_index[(*path, "lora_scaling")] for path, _ in modules),
            groups=tuple(mod.group for _, mod in modules),
            bounds=tuple(1.0 / (mod.d_in**0.5) for _, mod in modules),
        )

    def scalings(self, rest_leaves: Sequence[jax.Array]) -> Leaves:
        """The scaling leaves of ``rest_leaves``, in module order."""
        return tuple(rest_leaves[i] for i in self.scaling)

    def with_scalings(self, rest_leaves: Sequence[jax.Array], scalings: Leaves) -> Leaves:
        """``rest_leaves`` with the scaling leaves replaced by ``scalings`` (module order)."""
        leaves = list(rest_leaves)
        for i, value in zip(self.scaling, scalings, strict=True):
            leaves[i] = value
        return tuple(leaves)


@partial(jax.jit, static_argnames=("layout",))
def fresh_adapter(
    lora: Leaves,
    scalings: Leaves,
    slot: jax.Array,
    key: jax.Array,
    rank: jax.Array,
    values: tuple[jax.Array, ...],
    *,
    layout: SlotLayout,
) -> tuple[Leaves, Leaves]:
    """``lora`` and ``scalings`` with ``slot`` a fresh rank-``rank`` adapter: each module's
    scaling set to its entry of ``values`` (``alpha / rank`` where targeted, else 0); ``A``
    kaiming-uniform in its first ``rank`` columns where the scaling is not 0, else zero; ``B``
    zero."""
    new, new_scalings = list(lora), list(scalings)
    for i, (ai, bi, bound) in enumerate(zip(layout.a, layout.b, layout.bounds, strict=True)):
        leaf = lora[ai]
        shape = leaf.shape[1:]
        a = jax.random.uniform(jax.random.fold_in(key, i), shape, jnp.float32, -bound, bound)
        a = jnp.where((jnp.arange(shape[-1]) < rank) & (values[i] != 0), a, 0.0)
        new[ai] = leaf.at[slot].set(a.astype(leaf.dtype))
        new[bi] = lora[bi].at[slot].set(0)
        new_scalings[i] = scalings[i].at[slot].set(values[i].astype(scalings[i].dtype))
    return tuple(new), tuple(new_scalings)


@jax.jit
def zero_slot(groups: tuple[Leaves, ...], slot: jax.Array) -> tuple[Leaves, ...]:
    """Every leaf of every group with ``slot`` (its first axis) zeroed."""
    return tuple(tuple(leaf.at[slot].set(0) for leaf in leaves) for leaves in groups)


@jax.jit
def set_slot(leaves: Leaves, slot: jax.Array, values: tuple[Any, ...]) -> Leaves:
    """``leaves`` with ``slot`` (their first axis) set to ``values`` (one per leaf, shaped like
    a slot, cast to the leaf's dtype)."""
    return tuple(
        leaf.at[slot].set(value.astype(leaf.dtype))
        for leaf, value in zip(leaves, values, strict=True)
    )
