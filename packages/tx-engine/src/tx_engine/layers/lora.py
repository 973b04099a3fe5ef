"""Multi-tenant LoRA: every projection carries the factors of *all* adapter slots.

Formula, for batch row ``i`` with adapter slot ``s = adapter_indices_b[i]``::

    y = x·W + scaling[s] · (x·A[s])·B[s]        scaling[s] = alpha / rank   (0 for a free slot)

with ``A = lora_a [A, D_in, R]`` and ``B = lora_b [A, R, D_out]`` (the leading axis is the
adapter slot, R the *maximum* rank). MoE experts carry one factor pair per expert:
``lora_a [A, E, D_in, R]``, ``lora_b [A, E, R, D_out]``.

Grouping rows per adapter (dense projections), chosen statically from the shapes by
:func:`use_concat`:

* **gather** (training, prefill: many tokens per row) — each row's factors are gathered
  (``A[s]`` → ``[B, D_in, r]``, ``B[s]`` → ``[B, r, D_out]``) and two batched matmuls run; no
  sorting, minimal FLOPs, but ``B·r·(D_in+D_out)`` values are copied per call.
* **concat** (decode: ``T`` tokens per row with ``T·(S-1) ≤ 16`` and at least as many rows as
  slots ``S``) — ``x·[A_1 … A_S]`` → ``[B, T, S·r]``, every slot but the row's own masked to 0,
  then ``·[B_1; …; B_S]``. It reads each slot's factors once and copies nothing, at ``S``× the
  (small, for ``T`` small) LoRA FLOPs. A decode step's ``lm_head`` is where this matters: the
  gather writes ``B·r·V`` floats per step. Non-finite factors of one slot stay in that slot's
  rows in both forms (see :func:`delta_concat`).

Expert projections already sort tokens for ``jax.lax.ragged_dot``; they sort by ``(expert,
adapter)`` so the same ragged matmul applies the LoRA factors of each (expert, adapter) group.

Rank buckets: every :class:`LoRAFactors` has a plain-int attribute :attr:`active_rank` (the
maximum rank by default); both forms and the expert path compute with ``A[..., :r]`` and
``B[..., :r, :]`` only, ``r = active_rank``. This is exact whenever ``r`` ≥ the rank of every
adapter whose rows are in the batch, since columns / rows above an adapter's rank are zero
(below). A plain int lives in the nnx ``GraphDef``, which the compiled programs take as a static
argument, so each bucket is its own program: callers pick the graphdef with
:func:`graphdef_at_rank` (``TrainingEngine.graphdef_for_slots`` caches one per bucket) at
``r = rank_bucket(ranks in the batch, max_rank)``, a power of two ≥ 8 (:data:`MIN_RANK_BUCKET`),
so at most ``log2(max_rank / 8) + 3`` programs exist per batch shape, counting bucket 0: a
batch without adapter rows (base-model sampling, scoring against the base model) leaves every
LoRA term out of its program, since the base slot's term is exactly ``+0.0`` anyway, so it
costs what the base model costs (``compute_logprobs`` of 128 tokens on the small preset, 2 CPU
cores: 75 → 60 ms). Parameters keep the full ``R``: gradients are zero above
``r`` and optimizer state and checkpoints keep their shapes. Training touches only the bucket's
ranks of them too: :func:`take_slots` / :func:`put_slots` cut and write back ``[slots, …, :r]``,
so gradient accumulation and AdamW cost ``r``, not ``R`` (``step.forward_backward`` with
``rank``, ``step.apply_update``).

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
These functions edit a model; the engine does the same on its flat states in compiled programs
(:mod:`tx_engine.slot_programs`, which draws what :func:`init_adapter` draws).

Cost: memory is still padded: ``A·(D_in+D_out)·R`` per projection for ``A`` slots at the
maximum rank ``R``. Compute is not: a batch runs at its rank bucket ``r`` (the power of two ≥ the
largest rank present, at least 8), so a batch of rank-8 tenants costs ``2·T·(D_in+D_out)·8`` LoRA FLOPs per
row (gather form; ``S``× that in the concat form) whether ``R`` is 8 or 64, and ``1/8`` of what a
rank-64 tenant costs. A rank-8 tenant sharing a batch with a rank-64 one pays rank 64 in that
batch. Measured crossover for the forms (CPU, 2 cores, float32, ``D_in=512``, ``r=8``, ``S=5``;
ms per forward gather / concat): decode lm_head ``D_out=32000``, ``B=64``: 188 / 29
(``r=32``: 656 / 84); ``B=16, T=4``: 5.3 / 4.6; ``B=8, T=16``: 4.6 / 9.7; ``B=4, T=128`` (MLP,
fwd+bwd): 4.8 / 15.5; ``B=1, T=1``: 0.16 / 0.29.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Literal

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
    """The LoRA state of one projection; ``prefix`` is ``()`` or ``(E,)`` for experts.

    ``active_rank`` (static, in the GraphDef) is the rank computed with; see "Rank buckets".
    0 means no term at all: the owning projection skips :meth:`delta`.
    """

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
        # A plain int lives in the GraphDef, so it is static under jit (see "Rank buckets").
        self.active_rank = max_rank

    def factors(self) -> tuple[jax.Array, jax.Array]:
        """``lora_a`` / ``lora_b`` cut to the first :attr:`active_rank` rank columns / rows."""
        r = self.active_rank
        return self.lora_a[...][..., :r], self.lora_b[...][..., :r, :]

    def delta(self, x_btd: jax.Array, adapter_indices_b: jax.Array) -> jax.Array:
        """``scaling[s]·(x·A[s])·B[s]`` per row (dense projections only), in ``x``'s dtype."""
        a_sdr, b_srf = self.factors()
        b, t = x_btd.shape[:2]
        form = delta_concat if use_concat(b, t, a_sdr.shape[0]) else delta_gather
        return form(x_btd, adapter_indices_b, a_sdr, b_srf, self.lora_scaling[...])


def use_concat(rows: int, tokens_per_row: int, num_slots: int) -> bool:
    """Static choice between :func:`delta_concat` and :func:`delta_gather` (see "Grouping rows").

    Concat reads each slot's factors once but multiplies every token by every slot's factors
    (``num_slots``× the LoRA FLOPs); gather writes one copy of the factors per row. Concat wins
    when rows outnumber slots and each row has few tokens (decode), gather otherwise.
    """
    return rows >= num_slots and tokens_per_row * (num_slots - 1) <= CONCAT_MAX_EXTRA


CONCAT_MAX_EXTRA = 16  # tokens_per_row·(num_slots-1): the measured CPU crossover (see Cost)


def delta_gather(
    x_btd: jax.Array, idx_b: jax.Array, a_sdr: jax.Array, b_srf: jax.Array, scale_s: jax.Array
) -> jax.Array:
    """Gather each row's factors (``[B, D, r]``, ``[B, r, F]``) and run two batched matmuls."""
    dt, f32 = x_btd.dtype, jnp.float32  # accumulate in float32 even for bfloat16 activations
    a_bdr, b_brf = a_sdr[idx_b].astype(dt), b_srf[idx_b].astype(dt)
    xa_btr = jnp.einsum("btd,bdr->btr", x_btd, a_bdr, preferred_element_type=f32)
    xa_btr = (xa_btr * scale_s[idx_b][:, None, None]).astype(dt)
    return jnp.einsum("btr,brf->btf", xa_btr, b_brf, preferred_element_type=f32).astype(dt)


def delta_concat(
    x_btd: jax.Array, idx_b: jax.Array, a_sdr: jax.Array, b_srf: jax.Array, scale_s: jax.Array
) -> jax.Array:
    """All slots side by side: ``x·[A_1 … A_S]``, keep the row's own slot, then ``·[B_1; …; B_S]``.

    Reads every slot's factors once instead of writing a gathered copy per row. Isolation: the
    slot mask is a ``where`` (not a product), so a non-finite ``A`` of one slot never reaches
    another slot's rows; a non-finite ``B`` would (``0·NaN = NaN`` in the second matmul), so
    non-finite entries of ``B`` are zeroed first and the rows of *that* slot are made NaN
    instead — exactly the rows the gather form would poison.
    """
    dt, f32 = x_btd.dtype, jnp.float32  # accumulate in float32 even for bfloat16 activations
    b, t = x_btd.shape[:2]
    n_slots = a_sdr.shape[0]
    finite_srf = jnp.isfinite(b_srf)
    poisoned_s = ~jnp.all(finite_srf, axis=(1, 2))
    b_kf = jnp.where(finite_srf, b_srf, 0).reshape(-1, b_srf.shape[-1]).astype(dt)
    xa_btsr = jnp.einsum("btd,sdr->btsr", x_btd, a_sdr.astype(dt), preferred_element_type=f32)
    own_bs = idx_b[:, None] == jnp.arange(n_slots)[None, :]
    scaled_bs = jnp.where(poisoned_s[None, :], jnp.nan, scale_s[None, :])
    xa_btsr = jnp.where(own_bs[:, None, :, None], xa_btsr * scaled_bs[:, None, :, None], 0)
    xa_nk = xa_btsr.reshape(b * t, -1).astype(dt)
    y_nf = jnp.einsum("nk,kf->nf", xa_nk, b_kf, preferred_element_type=f32)
    return y_nf.reshape(b, t, -1).astype(dt)


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


MIN_RANK_BUCKET = 8  # below this, LoRA work is too small to be worth another compiled program


def rank_bucket(ranks: Iterable[int], max_rank: int) -> int:
    """The rank a batch is computed at: the power of two ≥ its largest rank, in
    ``[MIN_RANK_BUCKET, max_rank]`` (``max_rank`` itself when it is smaller or not a power of 2),
    or 0 when no rank is above 0 (base rows only: no LoRA term at all).

    ``ranks`` are the ranks of the adapters whose rows are in the batch (base rows: leave them
    out, or pass 0). Buckets ``8, 16, 32, …`` bound the compiled programs per shape to
    ``log2(max_rank / 8) + 2``; ranks 1-8 share one, since a rank-8 LoRA is already a tiny
    fraction of a layer's work and a separate program per small rank would cost compile time.
    """
    top = max((int(r) for r in ranks), default=0)
    if not 0 <= top <= max_rank:
        raise AdapterError(f"rank must be in [0, {max_rank}] (max_lora_rank), got {top}")
    return min(max_rank, 1 << max(MIN_RANK_BUCKET - 1, top - 1).bit_length()) if top else 0


def set_active_rank(model: nnx.Module, rank: int) -> None:
    """Compute every LoRA projection of ``model`` at rank ``rank`` (see "Rank buckets");
    0 leaves the LoRA terms out."""
    for _, mod in lora_modules(model):
        max_rank = mod.lora_a.shape[-1]
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= max_rank:
            raise AdapterError(f"active rank must be an int in [0, {max_rank}], got {rank!r}")
        mod.active_rank = rank


def graphdef_at_rank(graphdef: nnx.GraphDef[Any], *states: Any, rank: int) -> nnx.GraphDef[Any]:
    """``graphdef`` with every :attr:`LoRAFactors.active_rank` set to ``rank``.

    Only the static graph changes: ``states`` (the pieces ``graphdef`` was split with, in the
    same order) stay valid for the returned graphdef, and are not modified or copied.
    """
    model = nnx.merge(graphdef, *states)
    set_active_rank(model, rank)
    return nnx.graphdef(model)


def _rank_axis(path: tuple[Any, ...]) -> int:
    """Axis of the rank in a LoRA-shaped leaf: ``-1`` for ``lora_a``, ``-2`` for ``lora_b``."""
    names = {getattr(k, "key", None) for k in path}
    if "lora_a" in names:
        return -1
    if "lora_b" in names:
        return -2
    raise AdapterError(f"not a LoRA factor leaf: {jax.tree_util.keystr(path)}")


def _slot_index(leaf: jax.Array, path: tuple[Any, ...], rank: int) -> tuple[Any, ...]:
    """Index of the first ``rank`` rank entries of every slot (the slot axis is left to fill)."""
    cut: list[Any] = [slice(None)] * leaf.ndim
    cut[leaf.ndim + _rank_axis(path)] = slice(0, rank)
    return tuple(cut[1:])


def _region(leaf: jax.Array, path: tuple[Any, ...], rank: int) -> tuple[int, ...]:
    """Shape of one slot's first ``rank`` rank entries of ``leaf`` (slot axis kept, size 1)."""
    shape = [1, *leaf.shape[1:]]
    shape[leaf.ndim + _rank_axis(path)] = rank
    return tuple(shape)


def _slot_starts(slots: jax.Array, num_slots: int) -> list[jax.Array]:
    """Start index of each slot's region; negative slots count from the end, as in NumPy."""
    slots = jnp.asarray(slots, jnp.int32)
    return [jnp.where(slots[i] < 0, slots[i] + num_slots, slots[i]) for i in range(len(slots))]


def take_slots(tree: Any, slots: jax.Array | None, rank: int, *, contiguous: bool = False) -> Any:
    """Slots ``slots`` ([U] distinct ints; None: all) of a LoRA-shaped tree, cut to ``rank``.

    Leaves go from ``[A, …, D_in, R]`` / ``[A, …, R, D_out]`` to ``[U, …, D_in, r]`` /
    ``[U, …, r, D_out]``. Gradients, optimizer moments and updates of a batch's slots live there
    (everything above an adapter's rank is exactly zero, see "Rank buckets"), so training work
    scales with the tenants present and their rank bucket, not with ``A`` and ``R``.

    Chosen slots are cut with one ``dynamic_slice`` each (``U`` is static), not a gather: see
    :func:`put_slots` for why. ``contiguous`` promises ``slots`` are ``[s, s+1, …]`` (the caller
    checks on the host: :func:`tx_engine.step.training.is_run`): then one slice cuts them all.
    """

    def take(path: tuple[Any, ...], x: jax.Array) -> jax.Array:
        if slots is None:
            return x[(slice(None), *_slot_index(x, path, rank))]
        size = _region(x, path, rank)
        zeros = (0,) * (x.ndim - 1)
        starts = _slot_starts(slots, len(x))
        if contiguous:
            return jax.lax.dynamic_slice(x, (starts[0], *zeros), (len(starts), *size[1:]))
        cuts = [jax.lax.dynamic_slice(x, (s, *zeros), size) for s in starts]
        return jnp.concatenate(cuts) if len(cuts) != 1 else cuts[0]

    return jax.tree_util.tree_map_with_path(take, tree)


def put_slots(
    tree: Any,
    sub: Any,
    slots: jax.Array | None,
    rank: int,
    *,
    add: bool = False,
    contiguous: bool = False,
) -> Any:
    """``tree`` with :func:`take_slots`' region overwritten by (``add``: increased by) ``sub``.

    Under ``jit`` with ``tree`` donated this updates in place: only ``U·r`` of each leaf's
    ``A·R`` rank entries are touched. Chosen slots are written with one ``dynamic_update_slice``
    each rather than a scatter: XLA turns a scatter at traced slot indices into a bounds-checked
    select over the whole operand (its cost model: 6.4 MB accessed for two slots of a
    ``[5, 512, 64]`` leaf at ``r = 8``, against 0.7 MB for the slices). In place still needs
    the caller not to read other donated buffers in the same program (see
    :func:`tx_engine.step.apply_update`). ``contiguous``: as in :func:`take_slots`, one write.
    """

    def put(path: tuple[Any, ...], x: jax.Array, y: jax.Array) -> jax.Array:
        y = y.astype(x.dtype)
        if slots is None:
            at = x.at[(slice(None), *_slot_index(x, path, rank))]
            return at.add(y) if add else at.set(y)
        zeros = (0,) * (x.ndim - 1)
        size = _region(x, path, rank)
        starts = _slot_starts(slots, len(x))
        if contiguous:
            if add:
                y = y + jax.lax.dynamic_slice(x, (starts[0], *zeros), y.shape)
            return jax.lax.dynamic_update_slice(x, y, (starts[0], *zeros))
        for i, s in enumerate(starts):
            new = y[i : i + 1]
            if add:
                new = new + jax.lax.dynamic_slice(x, (s, *zeros), size)
            x = jax.lax.dynamic_update_slice(x, new, (s, *zeros))
        return x

    return jax.tree_util.tree_map_with_path(put, tree, sub)


def clear_adapter(model: nnx.Module, slot: int) -> None:
    """Free ``slot``: zero its factors and scaling so it reproduces the base model."""
    for _, mod in lora_modules(model):
        _check_slot(mod, slot)
        mod.lora_a[...] = mod.lora_a[...].at[slot].set(0)
        mod.lora_b[...] = mod.lora_b[...].at[slot].set(0)
        mod.lora_scaling[...] = mod.lora_scaling[...].at[slot].set(0)
