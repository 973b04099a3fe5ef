"""Merging the per-chunk results of one forward/backward call (spec §6.6).

Outputs are concatenated in chunk order. Metrics are reduced by the suffix of their
``name:reduction`` key: ``sum``/``min``/``max`` plainly; ``mean`` and ``slack``
(max − weighted mean) weighted by each chunk's datum count; ``hash2`` sums the values masked to
64 bits; ``unique`` keeps the first value and adds the others as ``key_1``, ``key_2``, …
(the SDK's code numbers them from 1; spec §6.6 says ``key_2``, the test follows the SDK).
Keys come from the first chunk and are dropped when another chunk lacks them; an unknown
suffix is dropped silently. These are the SDK's rules, so merged numbers are identical.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tx_types import ForwardBackwardOutput

__all__ = ["combine_outputs", "reduce_metrics"]

_MASK64 = 0xFFFF_FFFF_FFFF_FFFF


def _reduce(reduction: str, values: list[float], weights: list[int]) -> float | None:
    if reduction == "sum":
        return float(np.sum(values))
    if reduction == "min":
        return float(np.min(values))
    if reduction == "max":
        return float(np.max(values))
    if reduction == "mean":
        return float(np.average(values, weights=weights))
    if reduction == "slack":
        return float(np.max(values) - np.average(values, weights=weights))
    if reduction == "hash2":
        return float(sum(int(v) & _MASK64 for v in values) & _MASK64)
    return None


def reduce_metrics(results: Sequence[ForwardBackwardOutput]) -> dict[str, float]:
    """The combined metrics of several chunk results (see the module docstring)."""
    if not results:
        return {}
    weights = [len(r.loss_fn_outputs) for r in results]
    merged: dict[str, float] = {}
    for key in results[0].metrics:
        parts = key.split(":")
        if len(parts) != 2:
            raise ValueError(f"metric key {key!r} must have exactly one ':' (name:reduction)")
        if not all(key in r.metrics for r in results):
            continue
        values = [r.metrics[key] for r in results]
        if parts[1] == "unique":
            merged[key] = values[0]
            merged.update({f"{key}_{i + 1}": v for i, v in enumerate(values[1:])})
            continue
        reduced = _reduce(parts[1], values, weights)
        if reduced is not None:
            merged[key] = reduced
    return merged


def combine_outputs(results: Sequence[ForwardBackwardOutput]) -> ForwardBackwardOutput:
    """One ``ForwardBackwardOutput`` for the whole call."""
    if not results:
        return ForwardBackwardOutput(loss_fn_output_type="", loss_fn_outputs=[], metrics={})
    return ForwardBackwardOutput(
        loss_fn_output_type=results[0].loss_fn_output_type,
        loss_fn_outputs=[out for r in results for out in r.loss_fn_outputs],
        metrics=reduce_metrics(results),
    )
