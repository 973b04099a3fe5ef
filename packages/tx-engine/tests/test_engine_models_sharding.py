"""Sharded loading: on 8 forced host devices (dp=2 × fsdp=2 × tp=2), params land in their
logical-axis shardings and logits equal the single-device result within float32 tolerance.

Runs in a subprocess because the host device count is fixed when jax initialises.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

GOLDENS = Path(__file__).parent / "goldens"

SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from tx_engine.loading import load_model
from tx_engine.sharding import make_mesh
from tx_engine.layers.lora import init_adapter

assert len(jax.devices()) == 8
golden = sys.argv[1]
z = np.load(golden + "/logits.npz")
ids, pos, mask = (jnp.asarray(z["b0_" + k]) for k in ("input_ids", "position_ids", "attention_mask"))
slots = jnp.array([1, 0, 1])

@nnx.jit
def fwd(m):
    h = m(ids, positions_bt=pos, attention_mask_bt=mask, adapter_indices_b=slots)
    return m.compute_logits(h, slots)

out, placement = {}, {}
for name, mesh in (("one", None), ("mesh", make_mesh(dp=2, fsdp=2, tp=2))):
    model, _ = load_model(golden, max_lora_adapters=2, max_lora_rank=2, mesh=mesh)
    init_adapter(model, 1, rank=2, alpha=4.0, seed=0, train_unembed=True)
    for mod in (model.model.layers[0].self_attn.o_proj, model.lm_head):
        mod.lora.lora_b[...] = mod.lora.lora_b[...] + 0.05
    out[name] = np.asarray(fwd(model))
    if mesh is not None:
        q = model.model.layers[0].self_attn.q_proj.weight[...]
        placement = {
            "q_spec": list(q.sharding.spec),
            "q_shards": len(q.addressable_shards),
            "q_shard_shape": list(q.addressable_shards[0].data.shape),
        }
valid = np.asarray(mask).astype(bool)
err = np.abs(out["one"] - out["mesh"])[valid].max() / np.abs(out["one"][valid]).max()
print(json.dumps({"rel_err": float(err), **placement}))
"""


@pytest.mark.slow  # ~20 s: a fresh jax on 8 host devices compiles everything twice
def test_sharded_logits_match_single_device(
    run_on_simulated_devices: Callable[..., dict[str, Any]],
) -> None:
    result = run_on_simulated_devices(SCRIPT, str(GOLDENS / "qwen3"), devices=8)
    assert result["q_spec"] == ["fsdp", "tp"], result
    assert result["q_shards"] == 8, result
    assert result["q_shard_shape"] == [32, 32], result
    assert result["rel_err"] < 1e-5, result
