"""Sampling on a device mesh gives the tokens and logprobs it gives on a single device.

The sampler's programs take the engine's sharded weights and build their KV cache inside jit,
so XLA places the cache; resizing a running batch (rows added for a joining request, idle rows
dropped) gathers cache rows across whatever placement that is; so does the prefix cache's pool
(a follow-up request continues the first request's sequence from it); so do the programs
compiled ahead on a background thread, from the arguments' shardings. Runs in a subprocess
because the fake CPU device count (``XLA_FLAGS``) must be set before jax initialises.
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
    from tx_engine.sampler import Sampler, SampleRequestArrays

    prompt = np.array([11, 250, 37, 1999, 5, 88, 640, 12, 3, 901], np.int32)
    datum = DatumArrays(np.arange(100, 112), {"target_tokens": np.arange(101, 113)})
    first = [
        SampleRequestArrays(prompt, max_tokens=40, seed=1, stop=[], adapter=1),
        SampleRequestArrays(prompt[:5], 3, max_tokens=20, seed=2, stop=[], prompt_logprobs=True),
    ]
    joiner = SampleRequestArrays(prompt[3:], max_tokens=8, seed=3, stop=[], adapter=1)

    class JoinOnce:  # joins at the first step it is asked: the full 4-row batch grows to 8
        def __init__(self, sampler):
            self.sampler, self.done = sampler, False
        def due(self):
            return not self.done
        def run(self):
            self.done = True
            self.sampler.join(joiner)

    out = {}
    meshes = (("single", {}), ("dp2", {"mesh_dp": 2}), ("fsdp2_tp2", {"mesh_fsdp": 2, "mesh_tp": 2}))
    for name, mesh in meshes:
        eng = TrainingEngine(sys.argv[1], EngineConfig(max_lora_rank=8, batch_buckets=(4,), **mesh))
        slot = eng.create_adapter(8, seed=1)
        eng.forward_backward([AdapterBatch(slot, [datum])])
        eng.optim_step(slot, AdamParams(1e-2))
        # Compiling ahead first, on cold programs (their arguments carry the mesh's
        # shardings); then in place, warm, for a schedule independent of compile times.
        for ahead in (True, False):
            sampler = Sampler(
                eng, max_cache_tokens=512, max_batch=8, prefix_cache_tokens=512,
                compile_ahead=ahead,
            )
            results = sampler.sample(first, interruption=JoinOnce(sampler))
            follow = np.concatenate([prompt, results[0].sequences[0].tokens, [7, 8, 9]])
            results += sampler.sample(
                [SampleRequestArrays(follow.astype(np.int32), max_tokens=8, seed=4, stop=[], adapter=1)]
            )
            out[name if not ahead else name + "/ahead"] = {
                "resizes": sampler.resizes,
                "prefix_hits": sampler.prefix_cache.hits,
                "compile_waits": sampler.compile_waits,
                "tokens": [[list(map(int, s.tokens)) for s in r.sequences] for r in results],
                "logprobs": [[list(map(float, s.logprobs)) for s in r.sequences] for r in results],
                "prompt_logprobs": [float(x) for x in results[1].prompt_logprobs[1:]],
            }
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_mesh_sampling_with_resizes_matches_single_device(
    tiny_qwen3_dir: Path, run_on_simulated_devices: Callable[..., dict[str, Any]]
) -> None:
    results = run_on_simulated_devices(SCRIPT, str(tiny_qwen3_dir), devices=4)
    ref = results.pop("single")
    assert ref["resizes"] == 3  # grown 4 → 8 for the joiner; 8 → 4 and 4 → 1 as rows end
    assert ref["prefix_hits"] == 1  # the follow-up continued request 0's kept sequence
    assert ref["compile_waits"] == 0
    assert results["single/ahead"]["compile_waits"] > 0  # the joiner's programs were new
    for name, res in results.items():
        if not name.endswith("/ahead"):  # the schedule: only without compiling ahead
            assert res["resizes"] == ref["resizes"], name
            assert res["prefix_hits"] == ref["prefix_hits"], name
        assert res["tokens"] == ref["tokens"], name
        for got, want in zip(res["logprobs"], ref["logprobs"], strict=True):  # per request
            for a, b in zip(got, want, strict=True):  # per sample
                assert a == pytest.approx(b, abs=1e-5), name
        assert res["prompt_logprobs"] == pytest.approx(ref["prompt_logprobs"], abs=1e-5), name
