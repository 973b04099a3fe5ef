"""From per-adapter lists of datums to padded, bucketed micro-batches, and back.

The engine's inputs are plain arrays (:class:`DatumArrays`) grouped per adapter slot
(:class:`AdapterBatch`). This module

1. validates them (token ids in the vocabulary, target shapes, required loss inputs, loss
   config) and raises :class:`InputError` naming the offending field;
2. plans micro-batches: rows sorted by length (less padding), each micro-batch padded to a
   bucketed length ``T`` and a bucketed row count ``B`` with ``B·T`` at most the token budget,
   so the set of compiled shapes stays small and memory is bounded whatever the request size;
3. packs a micro-batch into the dict of arrays that :mod:`tx_engine.step` consumes, with
   per-row loss-config values (``[B, 1]``) so tenants with different configs share one call;
4. slices the padded outputs back into per-datum results.

Alignment follows Tinker: position ``i`` of ``input_tokens`` predicts ``target_tokens[i]``.
Padding is on the right; padded cells have ``loss_mask`` 0, which every loss kernel honours.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from tx_engine import losses
from tx_engine.config import EngineConfig
from tx_engine.errors import InputError

# Per-token inputs a kernel may read besides the required ones; anything else in
# `loss_fn_inputs` is ignored (the SDK and cookbook attach bookkeeping fields such as `mask`).
_CLIP_KEYS = ("clip_low_threshold", "clip_high_threshold")
_OPTIONAL_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("weights",),
    "importance_sampling": (),
    "ppo": _CLIP_KEYS,
    "cispo": _CLIP_KEYS,
    "dro": (),
    "gspo": _CLIP_KEYS,
}


@dataclass(frozen=True)
class DatumArrays:
    """One training example: ``input_tokens`` int ``[N]`` and its ``loss_fn_inputs``.

    ``loss_fn_inputs["target_tokens"]`` is int ``[N]`` or ``[N, K]``; the other entries are
    float ``[N]`` (``weights`` matches the target shape).
    """

    input_tokens: np.ndarray
    loss_fn_inputs: Mapping[str, np.ndarray]


@dataclass(frozen=True)
class AdapterBatch:
    """The datums of one adapter slot, with the loss to apply to them.

    ``slot=None`` runs the base model without any adapter (forward only).
    """

    slot: int | None
    data: Sequence[DatumArrays]
    loss_fn: str = "cross_entropy"
    loss_fn_config: Mapping[str, float] | None = None


@dataclass(frozen=True)
class DatumOutput:
    """Per-datum results: ``logprobs`` shaped like ``target_tokens``, ``elementwise_loss [N]``."""

    logprobs: np.ndarray
    elementwise_loss: np.ndarray


@dataclass
class GroupOutput:
    """Results of one :class:`AdapterBatch`, datums in request order; metrics ``loss:sum``."""

    outputs: list[DatumOutput] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    """One validated datum, as the planner sees it."""

    group: int
    index: int
    adapter_index: int
    tokens: np.ndarray
    inputs: dict[str, np.ndarray]
    config: dict[str, float]

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class MicroBatch:
    """Padded arrays for one compiled call and the rows they hold (row ``r`` = ``rows[r]``)."""

    arrays: dict[str, object]
    rows: list[Row] = field(default_factory=list)


def bucket(n: int, buckets: Sequence[int], minimum: int = 1) -> int:
    """Smallest bucket ≥ ``n``: the next power of two (≥ ``minimum``) when ``buckets`` is empty,
    otherwise the first listed bucket, or a multiple of the last one beyond it."""
    if not buckets:
        return max(minimum, 1 << max(0, n - 1).bit_length())
    for b in buckets:
        if b >= n:
            return b
    last = buckets[-1]
    return -(-n // last) * last


def _as_int_array(x: object, where: str, vocab_size: int, ndims: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "iu":
        raise InputError(f"{where} must be integer token ids, got dtype {arr.dtype}")
    if arr.ndim not in ndims:
        raise InputError(f"{where} must have {' or '.join(map(str, ndims))} dims, got {arr.shape}")
    if arr.size == 0:
        raise InputError(f"{where} must not be empty")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        bad = hi if hi >= vocab_size else lo
        raise InputError(f"{where} holds token id {bad}, outside the vocabulary [0, {vocab_size})")
    return arr.astype(np.int32)


def _validate_datum(
    datum: DatumArrays, where: str, loss_fn: str, vocab_size: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    tokens = _as_int_array(datum.input_tokens, f"{where}.input_tokens", vocab_size, (1,))
    names = set(datum.loss_fn_inputs)
    try:
        losses.check_loss_fn_inputs(loss_fn, names)
    except ValueError as exc:
        raise InputError(f"{where}: {exc}") from None
    targets = _as_int_array(
        datum.loss_fn_inputs["target_tokens"],
        f"{where}.loss_fn_inputs.target_tokens",
        vocab_size,
        (1, 2) if loss_fn == "cross_entropy" else (1,),
    )
    if targets.shape[0] != tokens.shape[0]:
        raise InputError(
            f"{where}.loss_fn_inputs.target_tokens has {targets.shape[0]} positions but "
            f"input_tokens has {tokens.shape[0]} (position i predicts target_tokens[i])"
        )
    inputs = {"target_tokens": targets}
    wanted = [*losses.REQUIRED_INPUTS[loss_fn], *_OPTIONAL_INPUTS[loss_fn]]
    for name in wanted:
        if name == "target_tokens" or name not in names:
            continue
        value = np.asarray(datum.loss_fn_inputs[name], np.float32)
        shape = targets.shape if name == "weights" else targets.shape[:1]
        if value.shape != shape:
            raise InputError(
                f"{where}.loss_fn_inputs.{name} has shape {value.shape}, expected {shape}"
            )
        if not np.all(np.isfinite(value)):
            raise InputError(f"{where}.loss_fn_inputs.{name} holds a non-finite value")
        inputs[name] = value
    if loss_fn == "cross_entropy" and "weights" not in inputs:
        # Explicit ones keep the batch pytree identical with and without weights: one program.
        inputs["weights"] = np.ones(targets.shape, np.float32)
    return tokens, inputs


def validate(
    groups: Sequence[AdapterBatch], vocab_size: int, adapter_index: Mapping[int | None, int]
) -> list[Row]:
    """Check every group and datum; return the rows in request order.

    ``adapter_index`` maps each allowed slot to the model's adapter index; a slot missing
    from it is reported as not allocated.
    """
    if not groups:
        raise InputError("batch must contain at least one adapter group")
    rows: list[Row] = []
    for g, group in enumerate(groups):
        where = f"groups[{g}]"
        if group.slot not in adapter_index:
            raise InputError(f"{where}.slot {group.slot} is not an allocated adapter slot")
        try:
            config = losses.resolve_loss_config(group.loss_fn, group.loss_fn_config)
        except ValueError as exc:
            raise InputError(f"{where}: {exc}") from None
        if not group.data:
            raise InputError(f"{where}.data must not be empty")
        for i, datum in enumerate(group.data):
            tokens, inputs = _validate_datum(datum, f"{where}.data[{i}]", group.loss_fn, vocab_size)
            rows.append(Row(g, i, adapter_index[group.slot], tokens, inputs, config))
    return rows


def plan(rows: Sequence[Row], config: EngineConfig) -> list[list[Row]]:
    """Split rows into micro-batches of at most ``tokens_per_micro_batch`` padded tokens.

    Longest rows first, so each micro-batch's bucketed length is set by its first row and
    similar lengths share a batch. A single row longer than the budget still gets its own
    micro-batch: it cannot be split along time without changing attention.
    """
    order = sorted(rows, key=lambda r: -r.length)
    batches: list[list[Row]] = []
    current: list[Row] = []
    for row in order:
        if current:
            t = bucket(current[0].length, config.seq_len_buckets, config.min_seq_len)
            b = bucket(len(current) + 1, config.batch_buckets)
            if b * t > config.tokens_per_micro_batch:
                batches.append(current)
                current = []
        current.append(row)
    if current:
        batches.append(current)
    return batches


def pack(rows: Sequence[Row], config: EngineConfig, pad_adapter_index: int) -> MicroBatch:
    """Pad ``rows`` (one loss fn) to bucketed ``[B, T]`` arrays.

    Keys: ``input_ids``, ``positions``, ``attention_mask``, ``adapter_indices``,
    ``loss_mask`` (float32), ``target_tokens`` (``[B, T]`` or ``[B, T, K]``), ``inputs`` (the
    float loss inputs) and ``config`` (loss config, ``[B, 1]`` per key). Padding rows use
    ``pad_adapter_index`` and a zero mask, so they contribute nothing to any loss or gradient.
    """
    t = bucket(max(r.length for r in rows), config.seq_len_buckets, config.min_seq_len)
    b = bucket(len(rows), config.batch_buckets)
    k_max = max((r.inputs["target_tokens"].shape[1:] or (0,))[0] for r in rows)
    k = bucket(k_max, ()) if k_max else 0
    tshape = (b, t, k) if k else (b, t)
    ids = np.zeros((b, t), np.int32)
    mask = np.zeros((b, t), np.float32)
    adapters = np.full((b,), pad_adapter_index, np.int32)
    targets = np.zeros(tshape, np.int32)
    input_names = sorted({n for r in rows for n in r.inputs} - {"target_tokens"})
    inputs = {n: np.zeros(tshape if n == "weights" else (b, t), np.float32) for n in input_names}
    cfg_names = sorted(rows[0].config)
    cfg = {n: np.zeros((b, 1), np.float32) for n in cfg_names}
    for r, row in enumerate(rows):
        n = row.length
        ids[r, :n] = row.tokens
        mask[r, :n] = 1.0
        adapters[r] = row.adapter_index
        tgt = row.inputs["target_tokens"]
        _fill(targets, r, tgt)
        for name in input_names:
            if name in row.inputs:
                _fill(inputs[name], r, row.inputs[name])
            else:  # optional input absent for this datum: its documented default
                default = 1.0 if name == "weights" else row.config[name]
                _fill(inputs[name], r, np.full(tgt.shape if name == "weights" else (n,), default))
        for name in cfg_names:
            cfg[name][r, 0] = row.config[name]
    for name in cfg_names:  # padding rows: a valid config (clip lo ≤ hi), masked anyway
        cfg[name][len(rows) :, 0] = rows[0].config[name]
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
    arrays: dict[str, object] = {
        "input_ids": ids,
        "positions": positions,
        "attention_mask": mask.astype(np.int32),
        "adapter_indices": adapters,
        "loss_mask": mask,
        "target_tokens": targets,
        "inputs": inputs,
        "config": cfg,
    }
    return MicroBatch(arrays, list(rows))


def _fill(dst: np.ndarray, r: int, src: np.ndarray) -> None:
    """Write ``src`` (``[n]`` or ``[n, k]``) into row ``r`` of the padded ``dst``."""
    if src.ndim == 1 and dst.ndim == 3:  # 1-D weights can't meet 2-D targets: validated
        raise AssertionError("unreachable: shapes validated")
    index: tuple[int | slice, ...] = (r, *(slice(0, s) for s in src.shape))
    dst[index] = src


def target_ndim(row: Row) -> int:
    """1 for ``[N]`` targets, 2 for ``[N, K]``: rows of different kinds are packed apart."""
    return int(row.inputs["target_tokens"].ndim)


def unpack(
    fetched: Sequence[tuple[Sequence[Row], tuple[np.ndarray, np.ndarray, np.ndarray]]],
    group_sizes: Sequence[int],
) -> list[GroupOutput]:
    """Per-group results from host copies of each micro-batch's padded outputs.

    ``fetched`` holds, per micro-batch, its rows and ``(logprobs, elementwise_loss, loss_sum)``;
    padding is sliced away and ``loss:sum`` is the sum over the group's rows, wherever the
    planner put them.
    """
    slots: list[list[DatumOutput | None]] = [[None] * n for n in group_sizes]
    sums = [0.0] * len(group_sizes)
    for rows, (logprobs, elementwise, loss_sum) in fetched:
        for r, row in enumerate(rows):
            shape = row.inputs["target_tokens"].shape
            index: tuple[int | slice, ...] = (r, *(slice(0, s) for s in shape))
            slots[row.group][row.index] = DatumOutput(
                np.asarray(logprobs[index], np.float32),
                np.asarray(elementwise[r, : row.length], np.float32),
            )
            sums[row.group] += float(loss_sum[r])
    results = []
    for outs, total in zip(slots, sums, strict=True):
        if any(o is None for o in outs):
            raise AssertionError("a datum was not planned into any micro-batch")
        results.append(GroupOutput([o for o in outs if o is not None], {"loss:sum": total}))
    return results
