"""Per-adapter AdamW with torch ``AdamW`` semantics, for LoRA slots stacked on an adapter axis.

Every leaf of the parameter pytree has a leading adapter axis ``A`` (``lora_a_adr``,
``lora_b_arf``, possibly nested in dicts or an ``nnx.State``). Slot ``i`` belongs to one tenant,
so everything is computed per slot: the gradient norm for clipping spans all leaves of that
slot only, hyperparameters are ``[A]`` arrays, the step count is ``[A]``, and
``step_mask[i] = False`` leaves slot ``i`` (params, moments, count) bit-for-bit untouched — the
new values are selected with ``jnp.where``, never recomputed with a zero learning rate.

A step whose gradient, new parameters or new moments are not all finite (an ``inf`` loss from
huge weights, a learning rate that overflows the update) is *skipped* for that slot: params,
moments and count stay as they were and ``StepMetrics.skipped`` says so (torch's ``GradScaler``
and optax's ``apply_if_finite`` do the same). Applied, one NaN would poison the adapter for
good — every later step and forward pass NaN — and one tenant's bad batch cannot be undone.

One step for a slot with ``step_mask`` true, exactly torch's single-tensor ``AdamW``::

    g     = g * min(1, clip / (||g||_slot + 1e-6))     if grad_clip_norm > 0 (clip_grad_norm_)
    t     = count + 1
    p     = p * (1 - lr * wd)                          decoupled weight decay
    m     = b1 * m + (1 - b1) * g
    v     = b2 * v + (1 - b2) * g^2
    p     = p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

Why not optax: ``optax.adamw`` (``scale_by_adam`` + ``add_decayed_weights``) is the same
algebra in another order, but its ``clip_by_global_norm`` scales by ``clip / norm`` instead of
torch's ``clip / (norm + 1e-6)``, it keeps one scalar count per state (per-slot counts and the
masked update would need ``vmap`` over ``inject_hyperparams`` plus the same ``where`` anyway),
and it reports no update norms. Twenty lines of ``jnp`` in torch's order of operations are
easier to check against torch than that composition. Moments are float32 whatever the
parameter dtype; the new parameters are cast back to it.

Hyperparameters are traced array inputs, so a new learning rate never recompiles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike

PyTree = Any

# Tinker's AdamParams defaults (wire spec §6.7).
DEFAULT_HYPER: dict[str, float] = {
    "learning_rate": 1e-4,
    "beta1": 0.9,
    "beta2": 0.95,
    "eps": 1e-12,
    "weight_decay": 0.0,
    "grad_clip_norm": 0.0,
}
_CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s denominator guard


class AdamHyper(NamedTuple):
    """Per-slot AdamW hyperparameters, each float32 ``[A]`` (``grad_clip_norm`` 0 = off)."""

    learning_rate: ArrayLike
    beta1: ArrayLike
    beta2: ArrayLike
    eps: ArrayLike
    weight_decay: ArrayLike
    grad_clip_norm: ArrayLike

    @classmethod
    def defaults(cls, num_adapters: int) -> AdamHyper:
        """Tinker's default ``AdamParams`` for every slot, as host (NumPy) arrays."""
        return cls(**{k: np.full((num_adapters,), v, np.float32) for k, v in DEFAULT_HYPER.items()})

    def with_slot(self, slot: int, **values: float) -> AdamHyper:
        """A copy with ``slot``'s entries replaced; unknown names raise ``ValueError``."""
        unknown = sorted(set(values) - set(self._fields))
        if unknown:
            raise ValueError(f"unknown AdamW hyperparameter(s): {', '.join(unknown)}")
        fields: dict[str, ArrayLike] = {}
        for name in self._fields:
            arr = np.array(getattr(self, name), np.float32)
            if name in values:
                arr[slot] = values[name]
            fields[name] = arr
        return AdamHyper(**fields)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OptState:
    """AdamW state: float32 moments shaped like the params and an int32 step count ``[A]``."""

    m: PyTree
    v: PyTree
    count: Array


class StepMetrics(NamedTuple):
    """Per-slot ``[A]`` diagnostics; the caller picks the slots it stepped."""

    grad_norm: Array  # before clipping
    update_norm: Array  # ||p_new - p_old||, weight decay included
    param_norm: Array  # after the step
    learning_rate: Array
    step: Array  # the slot's optimizer step count after this step (float32)
    skipped: Array  # 1.0 where a requested step was not finite and was not applied, else 0.0


def _num_adapters(params: PyTree) -> int:
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ValueError("params has no leaves")
    sizes = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"every params leaf needs the same leading adapter axis, got {sizes}")
    return int(next(iter(sizes)))  # type: ignore[arg-type]


def init_state(params: PyTree) -> OptState:
    """Zero moments (float32) and zero counts for every slot."""
    num_adapters = _num_adapters(params)
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    return OptState(zeros, jax.tree.map(jnp.copy, zeros), jnp.zeros((num_adapters,), jnp.int32))


def _per_slot(x: ArrayLike, leaf: Array) -> Array:
    """Broadcast an ``[A]`` vector against a leaf ``[A, ...]``."""
    return jnp.asarray(x).reshape((-1,) + (1,) * (leaf.ndim - 1))


def _slot_norm(tree: PyTree) -> Array:
    """L2 norm per slot over all leaves, in float32."""
    sq = [
        jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1)
        for x in jax.tree.leaves(tree)
    ]
    return jnp.sqrt(sum(sq[1:], sq[0]))


def _slot_finite(tree: PyTree) -> Array:
    """``[A]`` bool: whether every value of each slot is finite (no NaN, no inf). Not the norm:
    a sum of squares overflows for finite values past ~1e19."""
    flags = [
        jnp.all(jnp.isfinite(x).reshape(x.shape[0], -1), axis=1) for x in jax.tree.leaves(tree)
    ]
    return jnp.logical_and.reduce(jnp.stack(flags), axis=0)


def _clip_scale(grad_norm: Array, clip: ArrayLike) -> Array:
    """torch ``clip_grad_norm_``: multiply by ``min(1, clip / (norm + 1e-6))`` when clip > 0."""
    clip = jnp.asarray(clip)
    coef = jnp.minimum(clip / (grad_norm + _CLIP_EPS), 1.0)
    return jnp.where(clip > 0, coef, 1.0)


def _adamw_leaf(
    p: Array, g: Array, m: Array, v: Array, hyper: AdamHyper, t: Array, scale: Array
) -> tuple[Array, Array, Array]:
    """One AdamW step for one leaf, all slots at once, in torch's order of operations."""

    def col(x: ArrayLike) -> Array:
        return _per_slot(x, p)

    p32 = p.astype(jnp.float32)
    g32 = g.astype(jnp.float32) * col(scale)
    b1, b2 = col(hyper.beta1), col(hyper.beta2)
    p32 = p32 * (1.0 - col(hyper.learning_rate) * col(hyper.weight_decay))
    m_new = b1 * m + (1.0 - b1) * g32
    v_new = b2 * v + (1.0 - b2) * jnp.square(g32)
    step_size = col(hyper.learning_rate) / (1.0 - b1 ** col(t))
    denom = jnp.sqrt(v_new) / jnp.sqrt(1.0 - b2 ** col(t)) + col(hyper.eps)
    return (p32 - step_size * m_new / denom).astype(p.dtype), m_new, v_new


def apply_update(
    params: PyTree, grads: PyTree, state: OptState, hyper: AdamHyper, step_mask: Array
) -> tuple[PyTree, OptState, StepMetrics]:
    """One AdamW step for the slots where ``step_mask`` ([A] bool) is true.

    Pure and jit-friendly: the caller (``step.py``) jits it and donates ``params``/``state``.
    Slots with ``step_mask`` false keep params, moments and count bit-for-bit.
    """
    hyper = AdamHyper(*(jnp.asarray(h, jnp.float32) for h in hyper))
    step_mask = jnp.asarray(step_mask, jnp.bool_)
    grad_norm = _slot_norm(grads)
    scale = _clip_scale(grad_norm, hyper.grad_clip_norm)
    t = (state.count + 1).astype(jnp.float32)
    treedef, leaves = _flatten_alike(params=params, grads=grads, m=state.m, v=state.v)
    stepped = [_adamw_leaf(p, g, m, v, hyper, t, scale) for p, g, m, v in zip(*leaves, strict=True)]
    applied = step_mask & _slot_finite([leaves[1], stepped])
    new_p, new_m, new_v = [], [], []
    for (p, _g, m, v), (p2, m2, v2) in zip(zip(*leaves, strict=True), stepped, strict=True):
        keep = _per_slot(applied, p)
        new_p.append(jnp.where(keep, p2, p))
        new_m.append(jnp.where(keep, m2, m))
        new_v.append(jnp.where(keep, v2, v))
    params_out = jax.tree.unflatten(treedef, new_p)
    delta = [
        a.astype(jnp.float32) - b.astype(jnp.float32) for a, b in zip(new_p, leaves[0], strict=True)
    ]
    count = jnp.where(applied, state.count + 1, state.count)
    metrics = StepMetrics(
        grad_norm=grad_norm,
        update_norm=_slot_norm(delta),
        param_norm=_slot_norm(new_p),
        learning_rate=jnp.asarray(hyper.learning_rate),
        step=count.astype(jnp.float32),
        skipped=(step_mask & ~applied).astype(jnp.float32),
    )
    state_out = OptState(
        jax.tree.unflatten(treedef, new_m), jax.tree.unflatten(treedef, new_v), count
    )
    return params_out, state_out, metrics


def _flatten_alike(**trees: PyTree) -> tuple[Any, list[list[Array]]]:
    """Leaves of trees that must share the first one's structure; ``ValueError`` otherwise."""
    (first_name, first), *rest = trees.items()
    leaves, treedef = jax.tree.flatten(first)
    out = [leaves]
    for name, tree in rest:
        other, other_def = jax.tree.flatten(tree)
        if cast(Any, other_def) != treedef:  # cast: PyTreeDef's stub lacks __ne__
            raise ValueError(f"{name} does not have the structure of {first_name}: {other_def}")
        out.append(other)
    return treedef, out


def _path_name(path: tuple[Any, ...]) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _named_leaves(tree: PyTree, prefix: str) -> list[tuple[str, Array]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(f"{prefix}/{_path_name(path)}", leaf) for path, leaf in flat]


def slot_state_to_arrays(state: OptState, slot: int) -> dict[str, np.ndarray]:
    """One slot's state as flat NumPy arrays (``m/<path>``, ``v/<path>``, ``count``)."""
    out = {name: np.asarray(leaf[slot]) for name, leaf in _named_leaves(state.m, "m")}
    out.update({name: np.asarray(leaf[slot]) for name, leaf in _named_leaves(state.v, "v")})
    out["count"] = np.asarray(state.count[slot])
    return out


def slot_state_from_arrays(
    state: OptState, slot: int, arrays: Mapping[str, np.ndarray]
) -> OptState:
    """``state`` with ``slot`` overwritten by arrays from :func:`slot_state_to_arrays`.

    Key sets and per-slot shapes must match exactly; a ``ValueError`` lists the differences
    (a checkpoint of another rank or model must not be loaded silently).
    """
    expected = {
        name: leaf
        for tree, pre in ((state.m, "m"), (state.v, "v"))
        for name, leaf in _named_leaves(tree, pre)
    }
    expected["count"] = state.count
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    if missing or unexpected:
        raise ValueError(f"optimizer state mismatch: missing {missing}, unexpected {unexpected}")
    for name, leaf in expected.items():
        if tuple(np.shape(arrays[name])) != tuple(leaf.shape[1:]):
            raise ValueError(
                f"optimizer state {name!r}: shape {np.shape(arrays[name])}, expected {leaf.shape[1:]}"
            )

    def fill(tree: PyTree, prefix: str) -> PyTree:
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
        leaves = [
            leaf.at[slot].set(jnp.asarray(arrays[f"{prefix}/{_path_name(path)}"], leaf.dtype))
            for path, leaf in flat
        ]
        return jax.tree.unflatten(treedef, leaves)

    count = state.count.at[slot].set(jnp.asarray(arrays["count"], jnp.int32))
    return OptState(fill(state.m, "m"), fill(state.v, "v"), count)
