"""Expert parallelism: the MoE tiny model trains on an ``ep`` mesh exactly as on one device.

The slow test runs a :class:`TrainingEngine` on 8 forced host devices in a subprocess (the
device count is fixed when jax initialises, which this session has already done) for one
device, ``ep=2 × dp=2 × fsdp=2`` and ``ep=4 × tp=2``. Each does one AdamW step (so LoRA ``B``
is non-zero and ``A`` gets a real gradient), then a ``forward_backward`` whose gradients it
reads back through the public API: an ``optim_step`` with ``beta1=0`` and ``lr=0`` leaves the
weights alone and sets the first moment to exactly the accumulated gradient, which
``save_adapter`` writes as ``m/<key>``. It also checks that expert weights and their LoRA
factors really are split along ``ep``. The fast test checks the same placement rules in
process, on an abstract mesh.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from tx_engine.sharding import MESH_AXES, logical_to_pspec

SCRIPT = textwrap.dedent(
    """
    import json, sys, tempfile
    import jax
    import numpy as np
    from safetensors.numpy import load_file
    from tx_engine.config import EngineConfig
    from tx_engine.engine import AdamParams, AdapterBatch, DatumArrays, TrainingEngine

    assert len(jax.devices()) == 8, jax.devices()
    rng = np.random.default_rng(0)
    data = []
    for i in range(4):
        toks = rng.integers(3, 2000, 11 + 2 * i)
        weights = rng.uniform(0.2, 2.0, 10 + 2 * i)  # non-trivial cross_entropy weights
        data.append(DatumArrays(toks[:-1], {"target_tokens": toks[1:], "weights": weights}))
    meshes = {
        "single": {},
        "ep2_dp2_fsdp2": {"mesh_ep": 2, "mesh_dp": 2, "mesh_fsdp": 2},
        "ep4_tp2": {"mesh_ep": 4, "mesh_tp": 2},
    }
    out = {}
    for name, mesh in meshes.items():
        cfg = EngineConfig(max_lora_adapters=2, max_lora_rank=4, batch_buckets=(4,), **mesh)
        eng = TrainingEngine(sys.argv[1], cfg)
        slot = eng.create_adapter(4, seed=1)
        eng.forward_backward([AdapterBatch(slot, data)])
        eng.optim_step(slot, AdamParams(1e-2))
        fb = eng.forward_backward([AdapterBatch(slot, data)])[0]
        eng.optim_step(slot, AdamParams(learning_rate=0.0, beta1=0.0))  # m := gradient
        ckpt = tempfile.mkdtemp()
        eng.save_adapter(slot, ckpt)
        moments = load_file(ckpt + "/optimizer.safetensors")
        grads = {k[2:]: v.tolist() for k, v in moments.items() if k.startswith("m/")}
        specs = {}
        gate = eng._model().model.layers[0].mlp.experts["gate_proj"]
        for what, arr in (("weight", gate.weight[...]), ("lora_a", gate.lora.lora_a[...])):
            spec = getattr(arr.sharding, "spec", ())  # one device: SingleDeviceSharding
            specs[what] = [list(s) if isinstance(s, tuple) else s for s in spec]
            specs[what + "_shard"] = list(arr.addressable_shards[0].data.shape)
        logprobs = np.concatenate([o.logprobs for o in fb.outputs]).tolist()
        out[name] = {"loss": fb.metrics["loss:sum"], "logprobs": logprobs, "grads": grads,
                     "specs": specs}
    print(json.dumps(out))
    """
)


def _rel(a: object, ref: object) -> float:
    import numpy as np

    x, y = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-30))


@pytest.mark.slow  # ~1-4 min: a fresh jax on 8 host devices compiles every program 3 times
def test_expert_parallel_training_matches_single_device(
    tiny_qwen3_moe_dir: Path, run_on_simulated_devices: Callable[..., dict[str, Any]]
) -> None:
    results = run_on_simulated_devices(SCRIPT, str(tiny_qwen3_moe_dir), devices=8, timeout=900)
    ref = results.pop("single")
    # gate_proj of an 8-expert layer: weight [E=8, D=128, I=64], lora_a [A=3 (incl. base slot), E, D, R=4];
    # each device holds E/ep experts (and D/fsdp, I/tp of each).
    shards = {
        "ep2_dp2_fsdp2": ([4, 64, 64], [3, 4, 64, 4]),
        "ep4_tp2": ([2, 128, 32], [3, 2, 128, 4]),
    }
    for name, res in results.items():
        specs = res["specs"]
        assert specs["weight"][0] == "ep", (name, specs)
        assert specs["lora_a"][1] == "ep", (name, specs)
        assert [specs["weight_shard"], specs["lora_a_shard"]] == list(shards[name]), name
        assert res["loss"] == pytest.approx(ref["loss"], rel=1e-5), name
        assert _rel(res["logprobs"], ref["logprobs"]) <= 1e-5, name
        assert sorted(res["grads"]) == sorted(ref["grads"]), name
        # A non-zero gradient for every factor: the A gradients are real only because B != 0.
        for key, g_ref in ref["grads"].items():
            assert _rel(g_ref, [[0.0]]) > 0, key
            assert _rel(res["grads"][key], g_ref) <= 1e-4, (name, key)


@pytest.mark.parametrize(
    ("sizes", "axes", "shape", "expected"),
    [
        # expert weight [E, D, I]: experts split over ep, model dim over fsdp, mlp over tp
        ((2, 2, 1, 2), ("experts", "embed", "mlp"), (8, 128, 64), ("ep", "fsdp", "tp")),
        ((1, 1, 2, 4), ("experts", "embed", "mlp"), (8, 128, 64), ("ep", "fsdp", "tp")),
        # expert LoRA factor [A, E, D, R]: adapters and rank stay whole
        (
            (1, 1, 1, 8),
            ("adapters", "experts", "embed", "lora_rank"),
            (2, 8, 128, 4),
            (None, "ep", "fsdp", None),
        ),
        # 3 ep ranks cannot split 8 experts evenly: replicate rather than fail
        ((1, 1, 1, 3), ("experts", "embed", "mlp"), (8, 128, 64), (None, "fsdp", "tp")),
        # the router [D, E] is never expert-split: every rank routes every token
        ((1, 1, 1, 8), ("embed", None), (128, 8), ("fsdp", None)),
    ],
)
def test_expert_axis_rules(
    sizes: tuple[int, ...],
    axes: tuple[str | None, ...],
    shape: tuple[int, ...],
    expected: tuple[str | None, ...],
) -> None:
    mesh = AbstractMesh(sizes, MESH_AXES)
    assert logical_to_pspec(axes, mesh, shape=shape) == PartitionSpec(*expected)
