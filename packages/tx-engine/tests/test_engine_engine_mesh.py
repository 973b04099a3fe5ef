"""A TrainingEngine on a device mesh trains exactly like one on a single device.

Runs in a subprocess because the fake CPU device count (``XLA_FLAGS``) must be set before jax
initialises, which the rest of the test session has already done.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from tx_engine.config import EngineConfig
    from tx_engine.engine import AdamParams, AdapterBatch, DatumArrays, TrainingEngine

    data = [
        DatumArrays(np.arange(100 + i, 112 + i), {"target_tokens": np.arange(101 + i, 113 + i)})
        for i in range(4)
    ]
    out = {}
    for name, mesh in (("single", {}), ("dp2", {"mesh_dp": 2}), ("fsdp2_tp2", {"mesh_fsdp": 2, "mesh_tp": 2})):
        eng = TrainingEngine(sys.argv[1], EngineConfig(max_lora_rank=8, batch_buckets=(4,), **mesh))
        slot = eng.create_adapter(8, seed=1)
        fb = eng.forward_backward([AdapterBatch(slot, data)])[0]
        metrics = eng.optim_step(slot, AdamParams(1e-2))
        after = eng.forward([AdapterBatch(slot, data)])[0]
        out[name] = {
            "loss": fb.metrics["loss:sum"],
            "grad_norm": metrics["grad_norm"],
            "logprobs": np.concatenate([o.logprobs for o in after.outputs]).tolist(),
        }
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_mesh_training_matches_single_device(
    tiny_qwen3_dir: Path, run_on_simulated_devices: Callable[..., dict[str, Any]]
) -> None:
    results = run_on_simulated_devices(SCRIPT, str(tiny_qwen3_dir), devices=4)
    ref = results.pop("single")
    for name, res in results.items():
        assert res["loss"] == pytest.approx(ref["loss"], rel=1e-5), name
        assert res["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), name
        assert res["logprobs"] == pytest.approx(ref["logprobs"], abs=1e-5), name
