"""The training programs: forward, forward_backward, the per-slot AdamW update, full fine-tuning.

See :mod:`tx_engine.step` for the model's three pieces and the bucketing that keeps these
programs compiled once.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array
from jax.typing import ArrayLike

from tx_engine import losses, optim
from tx_engine.layers import lora as lora_lib
from tx_engine.sharding import TrainShardings, constrain, constrain_rows
from tx_engine.step.flat_state import FlatState, flat_jit
from tx_engine.step.graph import TRACE_COUNTS, Batch, State, StaticGraph, graph_of


def _loss(
    lora: State,
    graphdef: nnx.GraphDef[Any] | StaticGraph,
    rest: State,
    batch: Batch,
    loss_fn: str,
    logits_chunk: int,
    shardings: TrainShardings | None = None,
) -> tuple[Array, losses.LossOutputs]:
    """Summed loss over the batch and the per-datum outputs (the ``has_aux`` part).

    With ``shardings`` the final hidden states and the target log-probs are pinned to the
    batch-row split, so the ``lm_head`` / vocabulary work stays data-parallel whatever the
    propagation through the layers chose.
    """
    model: Any = nnx.merge(graph_of(graphdef), lora, rest)
    adapters_b = batch["adapter_indices"]
    hidden_btd = model(
        batch["input_ids"],
        positions_bt=batch["positions"],
        attention_mask_bt=batch["attention_mask"],
        adapter_indices_b=adapters_b,
    )
    hidden_btd = constrain_rows(hidden_btd, shardings)
    target_logprobs = _target_logprobs(
        model, hidden_btd, adapters_b, batch["target_tokens"], logits_chunk
    )
    target_logprobs = constrain_rows(target_logprobs, shardings)
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


@flat_jit(static_argnames=("graphdef", "loss_fn", "logits_chunk", "shardings"))
def forward(
    graphdef: nnx.GraphDef[Any] | StaticGraph,
    lora: State,
    rest: State,
    batch: Batch,
    loss_fn: str,
    logits_chunk: int = 0,
    shardings: TrainShardings | None = None,
) -> losses.LossOutputs:
    """Loss outputs of ``batch`` without gradients (Tinker ``forward``)."""
    TRACE_COUNTS["forward"] += 1
    _, outputs = _loss(lora, graphdef, rest, batch, loss_fn, logits_chunk, shardings)
    return outputs


@flat_jit(
    static_argnames=("graphdef", "loss_fn", "logits_chunk", "rank", "shardings"),
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
    shardings: TrainShardings | None = None,
) -> tuple[losses.LossOutputs, State]:
    """Loss outputs and ``grads + ∂(Σ loss)/∂lora`` (the accumulator, donated and returned).

    ``rank`` (≥ the rank bucket ``graphdef`` computes at) differentiates only the first
    ``rank`` rank entries of the factors and adds them into that part of ``grads`` in place:
    the same values (the gradient above the computed rank is exactly zero), without building
    and adding a max-rank, mostly-zero gradient tree per micro-batch. None: all ranks.
    ``shardings`` (see :class:`~tx_engine.sharding.TrainShardings`) pins the returned
    accumulator to the declared gradient shardings, which the donated one has too.
    """
    TRACE_COUNTS["forward_backward"] += 1
    grad_fn = jax.grad(_loss, has_aux=True)
    args = (graphdef, rest, batch, loss_fn, logits_chunk, shardings)
    if rank is None:
        new_grads, outputs = grad_fn(lora, *args)
        summed = jax.tree.map(lambda acc, g: acc + g.astype(acc.dtype), grads, new_grads)
    else:
        sub_grads, outputs = grad_fn(lora_lib.take_slots(lora, None, rank), *args)
        summed = lora_lib.put_slots(grads, sub_grads, None, rank, add=True)
    return outputs, summed if shardings is None else constrain(summed, shardings.grads)


def is_run(slots: ArrayLike) -> bool:
    """Whether ``slots`` are consecutive ascending non-negative slots (``[s, s+1, …]``)."""
    host = np.asarray(slots)
    return bool(host.size > 1 and host[0] >= 0 and np.all(np.diff(host) == 1))


def apply_update(
    lora: State | FlatState,
    opt_state: optim.OptState,
    grads: State | FlatState,
    hyper: optim.AdamHyper,
    step_mask: ArrayLike,
    slots: ArrayLike,
    rank: int,
    shardings: TrainShardings | None = None,
) -> tuple[FlatState, optim.OptState, FlatState, optim.StepMetrics]:
    """AdamW on ``slots`` ([U] distinct) where ``step_mask`` ([U] bool) is set; their
    accumulators go to 0. ``hyper`` and the returned metrics are per entry of ``slots``.

    Only the first ``rank`` rank entries of those slots are read and written (``rank`` ≥ the
    rank bucket of every stepped adapter: above an adapter's rank, parameters, gradients and
    moments are zero and AdamW keeps them zero), so a step costs ``U·r``, not ``A·R``. Entries
    of ``slots`` not in the mask, and all other slots, keep params, moments, count and
    accumulated gradients bit-for-bit, so tenants step independently. ``lora``, ``opt_state``
    and ``grads`` are donated; ``shardings`` pins the returned ones to the declared shardings.

    Two programs, :func:`adamw_slots` (reads) then :func:`write_slots` (in-place writes): in
    one program XLA fused the slot reads of one buffer into the writes of another (the moment
    updates read the accumulator that is cleared in place) and, unable to order them, copied
    every donated ``[A, …, R]`` buffer — twice — so a rank-8 step at ``max_lora_rank`` 64 moved
    6× the bytes of one at 8. Split, each write reads only its own buffer and fresh inputs.

    When ``slots`` are consecutive (:func:`is_run`, checked here on the host, so a second
    program per slot count at most), each leaf's region is cut and written with one slice
    instead of one per slot: on the small preset a 4-slot step went from 40–47 to 27–35 ms,
    the per-slot slices having been most of it (1820 in-place writes, each a dispatch).

    The trees go in as states or flat, and come back flat (:class:`FlatState`, an ``OptState``
    of them): the engine holds them so, and the intermediate results never become states
    (:func:`unflatten_states` rebuilds them).
    """
    cut = {"rank": rank, "contiguous": is_run(slots)}
    new_lora, new_opt, new_grads, metrics = adamw_slots.flat(
        lora, opt_state, grads, hyper, step_mask, slots, **cut
    )
    written: tuple[FlatState, optim.OptState, FlatState] = write_slots.flat(
        lora, opt_state, grads, new_lora, new_opt, new_grads, slots, **cut, shardings=shardings
    )
    return *written, metrics


@flat_jit(static_argnames=("rank", "contiguous"))
def adamw_slots(
    lora: State,
    opt_state: optim.OptState,
    grads: State,
    hyper: optim.AdamHyper,
    step_mask: Array,
    slots: Array,
    rank: int,
    contiguous: bool = False,
) -> tuple[State, optim.OptState, State, optim.StepMetrics]:
    """The read half of :func:`apply_update`: new ``[U, …, r]`` params, moments, counts and
    accumulator of ``slots`` (cleared wherever a step was asked for, also when the step was
    skipped as not finite: those gradients are spent), and the per-entry metrics."""
    TRACE_COUNTS["apply_update"] += 1

    def take(tree: State) -> State:
        return lora_lib.take_slots(  # type: ignore[no-any-return]
            tree, slots, rank, contiguous=contiguous
        )

    sub_opt = optim.OptState(take(opt_state.m), take(opt_state.v), opt_state.count[slots])
    sub_grads = take(grads)
    new_lora, new_opt, metrics = optim.apply_update(
        take(lora), sub_grads, sub_opt, hyper, step_mask
    )

    def clear(g: Array) -> Array:
        stepped = step_mask.reshape((-1,) + (1,) * (g.ndim - 1))
        return jnp.where(stepped, jnp.zeros_like(g), g)

    return new_lora, new_opt, jax.tree.map(clear, sub_grads), metrics


@flat_jit(
    static_argnames=("rank", "contiguous", "shardings"),
    donate_argnames=("lora", "opt_state", "grads"),
)
def write_slots(
    lora: State,
    opt_state: optim.OptState,
    grads: State,
    new_lora: State,
    new_opt: optim.OptState,
    new_grads: State,
    slots: Array,
    rank: int,
    contiguous: bool = False,
    shardings: TrainShardings | None = None,
) -> tuple[State, optim.OptState, State]:
    """The write half of :func:`apply_update`: the ``[U, …, r]`` results into their slots, in
    place in the donated buffers, pinned to ``shardings`` when given."""
    TRACE_COUNTS["write_slots"] += 1

    def put(tree: State, sub: State) -> State:
        return lora_lib.put_slots(tree, sub, slots, rank, contiguous=contiguous)  # type: ignore[no-any-return]

    lora_out, grads_out = put(lora, new_lora), put(grads, new_grads)
    m, v = put(opt_state.m, new_opt.m), put(opt_state.v, new_opt.v)
    count = opt_state.count.at[slots].set(new_opt.count)
    if shardings is not None:
        lora_out = constrain(lora_out, shardings.lora)
        grads_out = constrain(grads_out, shardings.grads)
        m, v = constrain(m, shardings.lora), constrain(v, shardings.lora)
        count = constrain(count, shardings.opt_count)
    return lora_out, optim.OptState(m, v, count), grads_out


@flat_jit()
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


@flat_jit(
    static_argnames=("graphdef", "tx", "logits_chunk"), donate_argnames=("params", "opt_state")
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
