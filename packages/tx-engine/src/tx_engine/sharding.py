"""Sharding, declared once.

Mesh axes:

* ``dp``   — pure data parallelism (replicated params, batch split),
* ``fsdp`` — data parallelism with params sharded along their ``embed`` axis (ZeRO-3 style),
* ``tp``   — tensor parallelism (heads / mlp / vocab split),
* ``ep``   — expert parallelism (MoE experts split).

Model code never names mesh axes. Every parameter carries *logical* axis names in its nnx
metadata (key :data:`LOGICAL_AXES_KEY`), for example ``("embed", "mlp")`` for ``gate_proj``.
:data:`LOGICAL_RULES` maps each logical axis to a mesh axis (or ``None`` = replicated):

==============  =========  ===================================================
logical axis    mesh axis  why
==============  =========  ===================================================
``batch``       dp+fsdp    activations: every data-parallel replica a slice
``embed``       fsdp       model dim of weights: FSDP shards here
``mlp``         tp         Megatron column/row split of the MLP
``heads``       tp         attention heads split across tp
``kv_heads``    tp         GQA kv heads follow the q heads
``head_dim``    None       never split (rope mixes it)
``vocab``       tp         embedding / lm_head vocab split
``experts``     ep         each ep rank owns E/ep experts
``adapters``    None       every device serves every tenant
``lora_rank``   None       rank is small; splitting it is pure overhead
``norm``        None       1-D norm scales are tiny
==============  =========  ===================================================

A mesh axis of size 1 is harmless, so one rule set serves 1 device and a pod. We keep our own
metadata key instead of nnx's ``out_sharding`` because that one shards *eagerly* at variable
creation and demands a mesh even on one device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("dp", "fsdp", "tp", "ep")
LOGICAL_AXES_KEY = "logical_axes"

LOGICAL_RULES: Mapping[str, str | tuple[str, ...] | None] = {
    "batch": ("dp", "fsdp"),
    "embed": "fsdp",
    "mlp": "tp",
    "heads": "tp",
    "kv_heads": "tp",
    "head_dim": None,
    "vocab": "tp",
    "experts": "ep",
    "adapters": None,
    "lora_rank": None,
    "norm": None,
}


def make_mesh(dp: int = 1, fsdp: int = 1, tp: int = 1, ep: int = 1) -> Mesh:
    """A mesh over the first ``dp*fsdp*tp*ep`` devices with axes ``(dp, fsdp, tp, ep)``."""
    sizes = (dp, fsdp, tp, ep)
    n = int(np.prod(sizes))
    devices = jax.devices()
    if any(s < 1 for s in sizes) or n > len(devices):
        raise ValueError(
            f"mesh dp={dp} fsdp={fsdp} tp={tp} ep={ep} needs {n} devices, have {len(devices)}"
        )
    return Mesh(np.asarray(devices[:n]).reshape(sizes), MESH_AXES)


def logical_to_pspec(
    axes: Sequence[str | None],
    mesh: Mesh,
    rules: Mapping[str, str | tuple[str, ...] | None] = LOGICAL_RULES,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """PartitionSpec for logical ``axes``; a mesh axis is used once and only if it divides the dim.

    Skipping non-dividing axes keeps tiny test models (e.g. 2 kv heads on tp=4) placeable instead
    of failing; the dimension is then replicated, which is always correct.
    """
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    for i, name in enumerate(axes):
        target = rules.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(a for a in names if a in mesh.shape and a not in used)
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        if not names or (shape is not None and shape[i] % size != 0):
            spec.append(None)
            continue
        used.update(names)
        spec.append(names[0] if len(names) == 1 else names)
    return PartitionSpec(*spec)  # type: ignore[no-untyped-call]


def variable_sharding(var: nnx.Variable, mesh: Mesh) -> NamedSharding:  # type: ignore[type-arg]
    """NamedSharding of one variable from its logical-axes metadata (replicated if none)."""
    axes = var.get_metadata().get(LOGICAL_AXES_KEY) or (None,) * len(var.shape)
    return NamedSharding(mesh, logical_to_pspec(axes, mesh, shape=var.shape))


def state_shardings(state: nnx.State[Any, Any], mesh: Mesh) -> Any:
    """A state-shaped tree of NamedShardings, usable as jit in/out shardings."""
    return jax.tree.map(
        lambda v: v.replace(variable_sharding(v, mesh)),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def shard_model(model: nnx.Module, mesh: Mesh) -> None:
    """Move every variable of ``model`` to its sharding on ``mesh`` (in place)."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh)
    nnx.update(model, jax.device_put(state, shardings))


class TrainShardings:
    """Where the training state and activations live on ``mesh``, declared once per engine.

    Built from the logical-axis rules (:func:`state_shardings`), never from whatever the arrays
    happen to carry: ``lora`` (and the gradient accumulator and both AdamW moments, which have
    its shapes) follow each factor's logical axes, step counts are replicated, batch rows split
    over ``dp`` + ``fsdp`` when they divide. The training programs of :mod:`tx_engine.step`
    take it as a static argument and pin their outputs and key activations to it with
    ``with_sharding_constraint``, so what comes out is what was declared rather than what GSPMD
    propagation chose, a donated input and its output agree (the buffer is reused) and the
    next call sees the same input shardings (no recompilation). ``None`` in its place (one
    device) adds nothing to the programs. Hashed by identity: the engine passes one object.
    """

    __slots__ = ("grads", "lora", "mesh", "opt_count", "replicated")

    def __init__(self, mesh: Mesh, lora: nnx.State[Any, Any]) -> None:
        self.mesh = mesh
        self.lora: Any = state_shardings(lora, mesh)
        self.grads: Any = self.lora  # the accumulator has the factors' shapes and axes
        self.replicated = NamedSharding(mesh, PartitionSpec())  # type: ignore[no-untyped-call]
        self.opt_count = self.replicated

    def rows(self, shape: Sequence[int]) -> NamedSharding:
        """Batch-major activation ``shape``: rows over ``dp`` + ``fsdp`` if they divide it."""
        axes = ("batch",) + (None,) * (len(shape) - 1)
        return NamedSharding(self.mesh, logical_to_pspec(axes, self.mesh, shape=shape))


def constrain(tree: Any, shardings: Any) -> Any:
    """``with_sharding_constraint`` leaf by leaf (``shardings`` has ``tree``'s structure)."""
    return jax.tree.map(jax.lax.with_sharding_constraint, tree, shardings)


def constrain_rows(x: Any, shardings: TrainShardings | None) -> Any:
    """Pin a batch-major activation to :meth:`TrainShardings.rows`; identity without a mesh."""
    if shardings is None:
        return x
    return constrain(x, shardings.rows(x.shape))
