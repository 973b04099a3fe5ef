"""Dispatch now, fetch later: the split the server's worker uses to keep the device busy.

Several calls are dispatched before any result is fetched, then fetched out of order; every
result must equal what the same calls give one at a time, and a step's reported count must be
the one of *that* step even though later steps have since donated the optimizer state.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tx_engine.config import EngineConfig
from tx_engine.engine import AdamParams, AdapterBatch, DatumArrays, TrainingEngine
from tx_engine.errors import InputError

CONFIG = EngineConfig(
    max_lora_adapters=2, max_lora_rank=8, batch_buckets=(8,), logits_chunk_tokens=32
)


def _data(seed: int) -> list[DatumArrays]:
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(5, 2000, 12) for _ in range(3)]
    return [DatumArrays(s[:-1].astype(np.int32), {"target_tokens": s[1:]}) for s in seqs]


def _logprobs(groups: Any) -> np.ndarray:
    return np.concatenate([d.logprobs for d in groups[0].outputs])


def _two_steps(engine: TrainingEngine, later: bool) -> list[Any]:
    """fwd_bwd, step, fwd_bwd, step, forward — as plain calls or all dispatched first."""
    slot = engine.create_adapter(rank=8, seed=3)
    batch = [AdapterBatch(slot, _data(0))]
    adam = {slot: AdamParams(learning_rate=0.05)}
    calls: list[Callable[[], Any]] = [
        lambda: engine.forward_backward_later(batch),
        lambda: engine.optim_steps_later(adam),
    ] * 2 + [lambda: engine.forward_later(batch)]
    if later:
        fetches = [dispatch() for dispatch in calls]
        out = [fetch() for fetch in reversed(fetches)][::-1]  # the last one fetched first
    else:
        out = [dispatch()() for dispatch in calls]
    engine.free_adapter(slot)
    return out


def test_later_calls_fetched_out_of_order_equal_the_sequential_ones(tiny_qwen3_dir: Path) -> None:
    engine = TrainingEngine(tiny_qwen3_dir, CONFIG)
    sequential, later = _two_steps(engine, later=False), _two_steps(engine, later=True)
    for i in (0, 2, 4):  # forward_backward, forward_backward, forward
        np.testing.assert_array_equal(_logprobs(later[i]), _logprobs(sequential[i]))
        assert later[i][0].metrics == sequential[i][0].metrics
    for i, count in ((1, 1.0), (3, 2.0)):  # each step reports its own count
        (metrics,) = later[i].values()
        assert metrics == next(iter(sequential[i].values()))
        assert metrics["step"] == count
    assert np.abs(_logprobs(later[4]) - _logprobs(later[0])).max() > 1e-3  # the steps applied


def test_bad_input_raises_at_dispatch(tiny_qwen3_dir: Path) -> None:
    engine = TrainingEngine(tiny_qwen3_dir, CONFIG)
    bad = DatumArrays(np.array([5, 6], np.int32), {"target_tokens": np.array([1, 10**7])})
    with pytest.raises(InputError, match="target_tokens"):
        engine.forward_later([AdapterBatch(None, [bad])])
    with pytest.raises(InputError, match="at least one slot"):
        engine.optim_steps_later({})
