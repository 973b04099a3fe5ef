"""A rank-8 tenant costs the same whether ``max_lora_rank`` is 8 or 64.

Judged by XLA itself on the compiled programs the engine dispatches for one training step —
``forward_backward`` and the two halves of ``apply_update`` (``adamw_slots``, ``write_slots``)
— not by wall-clock time, so the test is deterministic on a busy machine: FLOPs equal, bytes of
the optimizer step equal, and no program copies a whole ``[A, …, R]`` LoRA-shaped buffer. The
optimizer step as one program did exactly that (XLA copied every donated buffer twice to keep
fused slot reads apart from in-place writes): 240 full copies on this model and 6.3× the bytes
at ``R = 64``, which on the ``small`` preset made a rank-8 step's optimizer part 4× slower.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from tx_engine import batching, optim, step
from tx_engine.config import EngineConfig
from tx_engine.engine import AdapterBatch, DatumArrays, TrainingEngine
from tx_engine.step import training

GOLDEN_QWEN3 = Path(__file__).parent / "goldens" / "qwen3"


def _costs(max_rank: int, tenants: int) -> dict[str, dict[str, float]]:
    """Cost analysis of one training step of ``tenants`` rank-8 adapters at ``max_rank``."""
    engine = TrainingEngine(GOLDEN_QWEN3, EngineConfig(max_lora_adapters=4, max_lora_rank=max_rank))
    slots = [engine.create_adapter(rank=8, seed=i) for i in range(tenants)]
    rng = np.random.default_rng(0)
    groups = [
        AdapterBatch(
            s, [DatumArrays(rng.integers(3, 290, 32), {"target_tokens": rng.integers(3, 290, 32)})]
        )
        for s in slots
    ]
    rows = batching.validate(groups, engine.vocab_size, {s: s for s in slots})
    batch = engine._place_batch(batching.pack(rows, engine.config, 0).arrays)
    rank = engine._rank_for_slots(slots)
    fb = step.forward_backward.lower(
        engine.graphdef_for_slots(slots),
        engine._lora,
        engine._rest,
        engine._grads,
        batch,
        "cross_entropy",
        engine.config.logits_chunk_tokens,
        rank,
    )
    live = engine._live_slots()
    reads = (engine._lora, engine._opt, engine._grads)
    hyper, mask = optim.AdamHyper.defaults(len(live)), np.isin(live, slots)
    cut = {"rank": rank, "contiguous": training.is_run(live)}  # as step.apply_update does
    adamw = training.adamw_slots.lower(*reads, hyper, mask, live, **cut)
    new = jax.eval_shape(partial(training.adamw_slots, **cut), *reads, hyper, mask, live)
    write = training.write_slots.lower(*reads, *new[:3], live, **cut)
    programs = {"forward_backward": fb, "adamw_slots": adamw, "write_slots": write}
    full = {"f32[" + ",".join(map(str, x.shape)) + "]" for x in jax.tree.leaves(engine._lora)}
    return {name: _cost(low, full) for name, low in programs.items()}


def _cost(lowered: Any, full_shapes: set[str]) -> dict[str, float]:
    """XLA's FLOPs and bytes, and how many full ``[A, …, R]`` LoRA-shaped copies it makes."""
    compiled = lowered.compile()
    analysis = compiled.cost_analysis()
    out = {key: float(analysis[key]) for key in ("flops", "bytes accessed")}
    copies = re.findall(r"= (f32\[[0-9,]+\])\S* copy\(", compiled.as_text())
    out["full_copies"] = sum(shape in full_shapes for shape in copies)
    return out


@pytest.mark.parametrize("tenants", [1, 3])  # 3: four live slots, cut as one window
def test_rank8_step_costs_the_same_at_max_rank_64(tenants: int) -> None:
    small, large = _costs(8, tenants), _costs(64, tenants)
    for program, cost in large.items():
        assert cost["full_copies"] == 0, f"{program} copies whole [A, …, R] LoRA buffers"
        ratio = cost["flops"] / small[program]["flops"]
        assert ratio < 1.05, f"{program}: R_max=64 takes {ratio:.2f}× the FLOPs of R_max=8"
    # The optimizer step reads and writes U·r entries per leaf whatever R is. (XLA's byte count
    # of forward_backward includes the whole accumulator its in-place update slices into, so
    # its bytes are checked through the copies above instead.)
    for program in ("adamw_slots", "write_slots"):
        ratio = large[program]["bytes accessed"] / small[program]["bytes accessed"]
        assert ratio < 1.05, f"{program}: R_max=64 moves {ratio:.2f}× the bytes of R_max=8"
