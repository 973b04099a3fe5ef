"""The training programs pin their outputs to the shardings the engine declares.

On 8 forced host devices (a subprocess: the device count is fixed when jax initialises, which
this session has already done) a ``tp=2 × fsdp=2 × dp=2`` engine runs ``forward_backward`` and
``optim_steps``; afterwards the gradient accumulator, the LoRA factors, both AdamW moments and
the step counts carry exactly the NamedShardings of :class:`tx_engine.sharding.TrainShardings`
(built from the logical-axis rules), batch activations are split over ``dp`` + ``fsdp``, the
donated accumulator was consumed, a second step compiles nothing, and losses, gradients and
updated weights equal a one-device engine's within float32 summation-order tolerance.
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
    import jax
    import numpy as np
    from tx_engine import batching, step
    from tx_engine.config import EngineConfig
    from tx_engine.engine import AdamParams, AdapterBatch, DatumArrays, TrainingEngine

    assert len(jax.devices()) == 8, jax.devices()
    rng = np.random.default_rng(0)
    data = []
    for i in range(4):
        toks = rng.integers(3, 2000, 13 + 2 * i)
        data.append(DatumArrays(toks[:-1], {"target_tokens": toks[1:]}))

    def leaves(tree):
        return jax.tree.leaves(tree)

    def placement(actual, declared):
        bad = [i for i, (a, d) in enumerate(zip(leaves(actual), leaves(declared), strict=True))
               if not a.sharding.is_equivalent_to(d, a.ndim)]
        split = sum(1 for d in leaves(declared) if any(s is not None for s in d.spec))
        return {"mismatched": len(bad), "split_leaves": split, "leaves": len(leaves(actual))}

    out = {}
    for name, mesh in (("single", {}), ("mesh", {"mesh_dp": 2, "mesh_fsdp": 2, "mesh_tp": 2})):
        cfg = EngineConfig(max_lora_adapters=2, max_lora_rank=8, batch_buckets=(4,), **mesh)
        eng = TrainingEngine(sys.argv[1], cfg)
        a = eng.create_adapter(8, seed=1)
        b = eng.create_adapter(4, seed=2)
        groups = [AdapterBatch(a, data[:2]), AdapterBatch(b, data[2:])]
        eng.forward_backward(groups)  # warm-up: compile everything once
        eng.optim_steps({a: AdamParams(1e-2), b: AdamParams(1e-2)})
        traces = dict(step.TRACE_COUNTS)
        old_grad = leaves(eng._grads)[0]
        fb = eng.forward_backward(groups)
        res = {
            "loss": [g.metrics["loss:sum"] for g in fb],
            "grads": [np.asarray(x).tolist() for x in leaves(eng._grads)],
            "donated": bool(old_grad.is_deleted()),
        }
        sh = eng._shardings
        if sh is not None:
            res["grads_after_fb"] = placement(eng._grads, sh.grads)
        eng.optim_steps({a: AdamParams(1e-2), b: AdamParams(1e-2)})
        res["lora"] = [np.asarray(x).tolist() for x in leaves(eng._lora)]
        res["recompiled"] = {k: v - traces.get(k, 0) for k, v in step.TRACE_COUNTS.items()
                             if v != traces.get(k, 0)}
        if sh is not None:
            res["after_step"] = {
                "lora": placement(eng._lora, sh.lora),
                "grads": placement(eng._grads, sh.grads),
                "m": placement(eng._opt.m, sh.lora),
                "v": placement(eng._opt.v, sh.lora),
                "count": placement(eng._opt.count, sh.opt_count),
            }
            rows = batching.validate([AdapterBatch(a, data)], eng.vocab_size, {a: a})
            mb = batching.pack(rows, eng.config, 0)
            outputs = eng._dispatch(mb.arrays, "cross_entropy", backward=True)
            res["logprobs_spec"] = [list(s) if isinstance(s, tuple) else s
                                    for s in outputs.logprobs.sharding.spec]
            res["logprobs_shard"] = list(outputs.logprobs.addressable_shards[0].data.shape)
            res["logprobs_shape"] = list(outputs.logprobs.shape)
        out[name] = res
    print(json.dumps(out))
    """
)


def _max_rel(a: list[object], b: list[object]) -> float:
    import numpy as np

    worst = 0.0
    for x, y in zip(a, b, strict=True):
        xa, ya = np.asarray(x, np.float64), np.asarray(y, np.float64)
        worst = max(worst, float(np.abs(xa - ya).max() / max(np.abs(ya).max(), 1e-30)))
    return worst


def test_mesh_training_outputs_carry_the_declared_shardings(
    tiny_qwen3_dir: Path, run_on_simulated_devices: Callable[..., dict[str, Any]]
) -> None:
    results = run_on_simulated_devices(SCRIPT, str(tiny_qwen3_dir), devices=8)
    ref, mesh = results["single"], results["mesh"]

    assert mesh["grads_after_fb"]["mismatched"] == 0
    assert mesh["grads_after_fb"]["split_leaves"] > 0  # tp / fsdp really split some factors
    for what, report in mesh["after_step"].items():
        assert report["mismatched"] == 0, what
    assert mesh["after_step"]["lora"]["split_leaves"] == mesh["after_step"]["lora"]["leaves"]
    # Activations: rows over dp+fsdp (4 ways), time whole.
    spec = mesh["logprobs_spec"]
    assert spec[0] == ["dp", "fsdp"], spec
    assert all(s is None for s in spec[1:]), spec
    rows, length = mesh["logprobs_shape"]
    assert mesh["logprobs_shard"] == [rows // 4, length]

    for res in (ref, mesh):
        assert res["donated"]  # the accumulator's buffer was reused, not copied
        assert res["recompiled"] == {}  # a second identical step compiles nothing
    assert mesh["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert _max_rel(mesh["grads"], ref["grads"]) < 1e-4
    assert _max_rel(mesh["lora"], ref["lora"]) < 1e-4  # Adam amplifies tiny gradient noise
