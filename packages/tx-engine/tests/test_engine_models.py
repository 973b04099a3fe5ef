"""Models vs transformers goldens (float32), config parsing, loading errors, save round trip.

Parity metric (never loosen): per batch, ``max |ours − ref| / max |ref|`` over real (unpadded)
positions must be ≤ 1e-4. The goldens come from ``scripts/make_engine_goldens.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tx_engine.errors import CheckpointError, ConfigError, UnsupportedArchitectureError
from tx_engine.layers.attention import KVCache
from tx_engine.layers.lora import LoRAParam, init_adapter
from tx_engine.layers.rope import rope_inv_freq
from tx_engine.loading import load_model, save_hf_weights
from tx_engine.models import LlamaConfig, model_class_for
from tx_engine.safetensors_io import iter_tensors, write_file

GOLDENS = Path(__file__).parent / "goldens"
ARCHS = ["llama", "qwen3", "qwen3_moe"]
PARITY_RTOL = 1e-4


@nnx.jit
def _forward(model: Any, ids: Any, pos: Any, mask: Any, slots: Any) -> jax.Array:
    hidden = model(ids, positions_bt=pos, attention_mask_bt=mask, adapter_indices_b=slots)
    return model.compute_logits(hidden, slots)


def logits(model: Any, ids: Any, pos: Any, mask: Any, slots: Any) -> np.ndarray:
    """Jitted here, in the test: model code itself never jits (step.py owns that)."""
    return np.asarray(_forward(model, *(jnp.asarray(x) for x in (ids, pos, mask, slots))))


def golden_batches(arch: str) -> list[dict[str, np.ndarray]]:
    z = np.load(GOLDENS / arch / "logits.npz")
    n = len({k.split("_")[0] for k in z.files})
    return [{k.split("_", 1)[1]: z[k] for k in z.files if k.startswith(f"b{i}_")} for i in range(n)]


def rel_error(ours: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    valid = mask.astype(bool)
    return float(np.abs(ours - ref)[valid].max() / np.abs(ref[valid]).max())


def batch_logits(model: Any, b: dict[str, np.ndarray]) -> np.ndarray:
    slots = np.zeros(b["input_ids"].shape[0], np.int32)
    out = logits(model, b["input_ids"], b["position_ids"], b["attention_mask"], slots)
    return out[:, int(b["logits_start"]) :]


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    return {a: load_model(GOLDENS / a, max_lora_adapters=3, max_lora_rank=4)[0] for a in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers_goldens(models: dict[str, Any], arch: str) -> None:
    for b in golden_batches(arch):
        start = int(b["logits_start"])
        err = rel_error(batch_logits(models[arch], b), b["logits"], b["attention_mask"][:, start:])
        assert err <= PARITY_RTOL, f"{arch}: relative error {err:.2e}"


def test_llama_golden_exercises_positions_beyond_2k() -> None:
    assert max(int(b["position_ids"].max()) for b in golden_batches("llama")) >= 2048
    assert max(b["input_ids"].shape[1] for b in golden_batches("llama")) > 2048


def test_llama3_rope_scaling_regimes() -> None:
    """Oracle straight from the Llama 3.1 reference: unchanged / smoothed / divided by factor."""
    cfg = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    cfg |= {"original_max_position_embeddings": 256, "rope_type": "llama3"}
    base = rope_inv_freq(16, 10000.0, None).astype(np.float64)
    ours = rope_inv_freq(16, 10000.0, cfg)
    wavelen = 2 * np.pi / base
    smooth = (256 / wavelen - 1.0) / 3.0
    expected = np.where(
        wavelen < 64,
        base,
        np.where(wavelen > 256, base / 8, (1 - smooth) * base / 8 + smooth * base),
    )
    np.testing.assert_allclose(ours, expected, rtol=1e-6)
    assert (wavelen < 64).any()
    assert (wavelen > 256).any()
    assert ((wavelen >= 64) & (wavelen <= 256)).any()


def test_config_formats_agree_and_errors_name_fields() -> None:
    hub = json.loads((GOLDENS / "llama" / "config.json").read_text())
    v5 = {k: v for k, v in hub.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {"rope_theta": hub["rope_theta"], **hub["rope_scaling"]}
    assert LlamaConfig.from_hf(hub) == LlamaConfig.from_hf(v5)
    with pytest.raises(ConfigError, match="'hidden_size'"):
        LlamaConfig.from_hf({k: v for k, v in hub.items() if k != "hidden_size"})
    with pytest.raises(ConfigError, match="yarn"):
        LlamaConfig.from_hf({**hub, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel"):
        model_class_for({"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ConfigError, match="'architectures'"):
        model_class_for({})


def test_missing_and_unexpected_keys_are_all_listed(tmp_path: Path) -> None:
    shutil.copy(GOLDENS / "qwen3_moe" / "config.json", tmp_path / "config.json")
    tensors = dict(iter_tensors(GOLDENS / "qwen3_moe" / "model.safetensors"))
    dropped = ["model.layers.1.mlp.experts.5.up_proj.weight", "model.norm.weight"]
    for k in dropped:
        del tensors[k]
    tensors["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
    tensors["rotary.inv_freq"] = np.zeros(3, np.float32)
    write_file(tmp_path / "model.safetensors", tensors)
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path)
    for key in [*dropped, "model.layers.0.extra.weight", "rotary.inv_freq"]:
        assert key in str(info.value)


def test_sharded_checkpoint_and_bf16_storage(models: dict[str, Any], tmp_path: Path) -> None:
    """Index-sharded files load identically; bfloat16 tensors load through ml_dtypes."""
    import ml_dtypes

    shutil.copy(GOLDENS / "qwen3" / "config.json", tmp_path / "config.json")
    tensors = dict(iter_tensors(GOLDENS / "qwen3" / "model.safetensors"))
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for fname, keys in shards.items():
        write_file(tmp_path / fname, {k: tensors[k].astype(ml_dtypes.bfloat16) for k in keys})
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    model, _ = load_model(tmp_path, max_lora_adapters=3, max_lora_rank=4, param_dtype=None)
    assert model.model.norm.weight.dtype == jnp.bfloat16
    b = golden_batches("qwen3")[0]
    ours = batch_logits(model, b)
    err = rel_error(ours, batch_logits(models["qwen3"], b), b["attention_mask"])
    assert 0 < err < 2e-2  # bf16 weights: close to, but not equal to, float32


def test_bfloat16_compute_is_close_to_float32(models: dict[str, Any]) -> None:
    model, _ = load_model(
        GOLDENS / "qwen3_moe", dtype=jnp.bfloat16, max_lora_adapters=3, max_lora_rank=4
    )
    b = golden_batches("qwen3_moe")[0]
    ours = batch_logits(model, b)
    assert ours.dtype == np.float32
    assert rel_error(ours, b["logits"], b["attention_mask"]) < 5e-2


def test_save_round_trip_and_lora_merge(models: dict[str, Any], tmp_path: Path) -> None:
    """save → load gives identical base logits; a merged slot equals that slot's LoRA logits."""
    model = models["llama"]
    init_adapter(model, 1, rank=4, alpha=8.0, seed=3, train_unembed=True)
    _randomise_b(model, slot=1, seed=4)
    b = golden_batches("llama")[0]
    ids, pos, mask = b["input_ids"], b["position_ids"], b["attention_mask"]
    base = logits(model, ids, pos, mask, np.zeros(3, np.int32))
    tuned = logits(model, ids, pos, mask, np.ones(3, np.int32))
    save_hf_weights(model, tmp_path / "base")
    save_hf_weights(model, tmp_path / "merged", merge_slot=1)
    _clear(model, slot=1)
    # Same LoRA capacity as the fixture: identical structure, so the jitted forward is reused.
    reloaded, _ = load_model(tmp_path / "base", max_lora_adapters=3, max_lora_rank=4)
    merged, _ = load_model(tmp_path / "merged", max_lora_adapters=3, max_lora_rank=4)
    valid = mask.astype(bool)
    np.testing.assert_array_equal(logits(reloaded, ids, pos, mask, np.zeros(3, np.int32)), base)
    assert rel_error(base, tuned, valid) > 1e-2  # the adapter really changes the output
    merged_logits = logits(merged, ids, pos, mask, np.zeros(3, np.int32))
    assert rel_error(merged_logits, tuned, valid) < 1e-5


def _randomise_b(model: Any, slot: int, seed: int) -> None:
    """Give a freshly initialised adapter non-zero B so its effect is visible."""
    key = jax.random.key(seed)
    for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model, LoRAParam))):
        if path[-1] == "lora_b":
            noise = 0.05 * jax.random.normal(jax.random.fold_in(key, i), var.shape[1:])
            var[...] = var[...].at[slot].set(noise)


def _clear(model: Any, slot: int) -> None:
    from tx_engine.layers.lora import clear_adapter

    clear_adapter(model, slot)


@nnx.jit
def _cached_step(model: Any, ids: Any, pos: Any, mask: Any, cache: KVCache) -> Any:
    slots = jnp.zeros(ids.shape[0], jnp.int32)
    h, cache = model(ids, positions_bt=pos, attention_mask_bt=mask, adapter_indices_b=slots, kv_cache=cache)  # fmt: skip
    return model.compute_logits(h, slots), cache


def test_kv_cache_prefill_then_decode_matches_full_forward(models: dict[str, Any]) -> None:
    model, cfg = models["llama"], models["llama"].config
    b = golden_batches("llama")[0]
    full = logits(model, b["input_ids"], b["position_ids"], b["attention_mask"], np.zeros(3, np.int32))[:1]  # fmt: skip
    ids, pos, mask = b["input_ids"][:1], b["position_ids"][:1], b["attention_mask"][:1]
    slots = jnp.zeros(1, jnp.int32)
    cache = KVCache.empty(
        cfg.num_hidden_layers, 1, 16, cfg.num_key_value_heads, cfg.head_dim, jnp.float32
    )
    p = 8
    h, cache = model(jnp.asarray(ids[:, :p]), positions_bt=jnp.asarray(pos[:, :p]), attention_mask_bt=jnp.asarray(mask[:, :p]), adapter_indices_b=slots, kv_cache=cache)  # fmt: skip
    steps = [np.asarray(model.compute_logits(h, slots))]
    for t in range(p, ids.shape[1]):
        h, cache = model(jnp.asarray(ids[:, t : t + 1]), positions_bt=jnp.asarray(pos[:, t : t + 1]), attention_mask_bt=jnp.asarray(mask[:, t : t + 1]), adapter_indices_b=slots, kv_cache=cache)  # fmt: skip
        steps.append(np.asarray(model.compute_logits(h, slots)))
    valid = mask.astype(bool)
    assert int(cache.index) == ids.shape[1]
    assert rel_error(np.concatenate(steps, axis=1), full, valid) < 1e-5
