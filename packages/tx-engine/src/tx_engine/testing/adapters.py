"""A LoRA adapter that changes the model's outputs, for tests that need one.

A fresh adapter's ``B`` factors are zero, so it computes exactly what the base model does, and a
test that compares adapter rows with base rows (or sampler logprobs with trainer logprobs on an
adapter) could pass with the adapter ignored. One optimizer step on a random sequence makes
every ``B`` factor non-zero.
"""

from __future__ import annotations

import numpy as np

from tx_engine.engine import AdamParams, AdapterBatch, DatumArrays, TrainingEngine

__all__ = ["stepped_adapter"]


def stepped_adapter(
    engine: TrainingEngine, *, rank: int = 8, seed: int = 1, high: int = 2000
) -> int:
    """A new adapter slot of ``engine`` after one AdamW step (lr 1e-2) on 12 random token ids
    in ``[5, high)`` drawn with ``seed``; its slot index."""
    slot = engine.create_adapter(rank=rank, seed=seed)
    seq = np.random.default_rng(seed).integers(5, high, 12)
    datum = DatumArrays(seq[:-1].astype(np.int32), {"target_tokens": seq[1:].astype(np.int64)})
    engine.forward_backward([AdapterBatch(slot, [datum])])
    engine.optim_step(slot, AdamParams(learning_rate=1e-2))
    return slot
