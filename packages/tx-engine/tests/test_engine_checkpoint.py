"""Adapter checkpoints: save → load into another slot, with and without optimizer; PEFT export."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tx_engine import checkpoint
from tx_engine.config import EngineConfig
from tx_engine.engine import AdamParams, AdapterBatch, DatumArrays, TrainingEngine
from tx_engine.errors import CheckpointError

CONFIG = EngineConfig(
    max_lora_adapters=4, max_lora_rank=8, batch_buckets=(8,), logits_chunk_tokens=32
)


def data(n: int, seed: int) -> list[DatumArrays]:
    rng = np.random.default_rng(seed)
    return [
        DatumArrays(rng.integers(5, 2000, 12), {"target_tokens": rng.integers(5, 2000, 12)})
        for _ in range(n)
    ]


def slot_leaves(tree: object, slot: int) -> list[np.ndarray]:
    return [np.asarray(x[slot]) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def engine(tiny_qwen3_dir: Path) -> TrainingEngine:
    return TrainingEngine(tiny_qwen3_dir, CONFIG)


@pytest.fixture
def trained(engine: TrainingEngine) -> tuple[TrainingEngine, int]:
    """A rank-4 adapter after two optimizer steps; every slot is freed afterwards."""
    slot = engine.create_adapter(rank=4, alpha=16.0, seed=11, train_mlp=False)
    for seed in (0, 1):
        engine.forward_backward([AdapterBatch(slot, data(2, seed))])
        engine.optim_step(slot, AdamParams(1e-2))
    yield engine, slot
    for s in list(engine.adapters):
        engine.free_adapter(s)


def test_round_trip_with_optimizer_continues_identically(
    trained: tuple[TrainingEngine, int], tmp_path: Path
) -> None:
    engine, src = trained
    engine.save_adapter(src, tmp_path / "ckpt")
    factors = load_file(tmp_path / "ckpt" / checkpoint.ADAPTER_FILE)
    assert factors["model.layers.0.self_attn.q_proj.lora.lora_a"].shape == (128, 4)  # trimmed
    assert factors["model.layers.0.self_attn.q_proj.lora.lora_b"].shape == (4, 256)
    engine.forward_backward([AdapterBatch(src, data(1, 4))])  # pending: not saved
    dst = engine.load_adapter(tmp_path / "ckpt")
    assert dst != src
    assert engine.adapters[dst] == engine.adapters[src]
    assert engine.step_count(dst) == engine.step_count(src) == 2
    scalings = [x for p, x in jax.tree.leaves_with_path(engine._rest) if "lora_scaling" in jax.tree_util.keystr(p)]  # fmt: skip
    for tree in (engine._lora, scalings, engine._opt.m, engine._opt.v):  # the whole slot, exactly
        for a, b in zip(slot_leaves(tree, src), slot_leaves(tree, dst), strict=True):
            np.testing.assert_array_equal(a, b)
    assert not any(np.any(g) for g in slot_leaves(engine._grads, dst))
    engine.load_adapter(tmp_path / "ckpt", slot=src)  # into the slot itself: drops its gradient
    assert not any(np.any(g) for g in slot_leaves(engine._grads, src))
    probe = data(3, 5)
    out = engine.forward([AdapterBatch(src, probe), AdapterBatch(dst, probe)])
    for a, b in zip(out[0].outputs, out[1].outputs, strict=True):
        np.testing.assert_array_equal(a.logprobs, b.logprobs)
    step_data = data(2, 6)
    engine.forward_backward([AdapterBatch(src, step_data), AdapterBatch(dst, step_data)])
    metrics = engine.optim_steps({src: AdamParams(1e-2), dst: AdamParams(1e-2)})
    assert metrics[src] == pytest.approx(metrics[dst], rel=1e-6)
    for tree in (engine._lora, engine._opt.m, engine._opt.v):
        for a, b in zip(slot_leaves(tree, src), slot_leaves(tree, dst), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_load_without_optimizer_resets_moments(
    trained: tuple[TrainingEngine, int], tmp_path: Path
) -> None:
    engine, src = trained
    engine.save_adapter(src, tmp_path / "weights-only", include_optimizer=False)
    assert not (tmp_path / "weights-only" / checkpoint.OPTIMIZER_FILE).exists()
    with pytest.raises(CheckpointError, match="without optimizer state"):
        engine.load_adapter(tmp_path / "weights-only")
    dst = engine.load_adapter(tmp_path / "weights-only", slot=3, with_optimizer=False)
    assert dst == 3
    assert engine.step_count(dst) == 0
    for tree in (engine._opt.m, engine._opt.v):
        assert all(not np.any(x) for x in slot_leaves(tree, dst))
    for a, b in zip(slot_leaves(engine._lora, src), slot_leaves(engine._lora, dst), strict=True):
        np.testing.assert_array_equal(a, b)
    # the first step from reset moments is AdamW's first step: |Δp| = lr for every touched entry
    engine.forward_backward([AdapterBatch(dst, data(2, 7))])
    before = slot_leaves(engine._lora, dst)
    engine.optim_step(dst, AdamParams(1e-3))
    for a, b in zip(before, slot_leaves(engine._lora, dst), strict=True):
        moved = np.abs(b - a)[np.abs(b - a) > 0]
        np.testing.assert_allclose(moved, 1e-3, rtol=1e-3)


def test_mismatched_checkpoint_is_rejected_with_the_key_list(
    trained: tuple[TrainingEngine, int], tmp_path: Path
) -> None:
    engine, src = trained
    ckpt = tmp_path / "broken"
    engine.save_adapter(src, ckpt)
    tensors = load_file(ckpt / checkpoint.ADAPTER_FILE)
    tensors.pop("lm_head.lora.lora_a")
    tensors["bogus.lora.lora_a"] = np.zeros((2, 2), np.float32)
    save_file(tensors, ckpt / checkpoint.ADAPTER_FILE)
    with pytest.raises(CheckpointError, match=r"missing keys \['lm_head.lora.lora_a'\]"):
        engine.load_adapter(ckpt)
    assert set(engine.adapters) == {src}  # nothing was allocated by the failed load
    with pytest.raises(CheckpointError, match="not an adapter checkpoint"):
        engine.load_adapter(tmp_path / "missing")


def _cut(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_damaged_adapter_files_are_checkpoint_errors_naming_the_file(
    trained: tuple[TrainingEngine, int], tmp_path: Path
) -> None:
    """A cut adapter or optimizer file, or bad metadata JSON, is the user's CheckpointError
    naming the file (the server reports it as such), not the library's raw error."""
    engine, src = trained
    engine.save_adapter(src, tmp_path / "ok")
    for name, keep in ((checkpoint.ADAPTER_FILE, 200), (checkpoint.OPTIMIZER_FILE, 4)):
        bad = tmp_path / f"cut-{name}"
        engine.save_adapter(src, bad)
        _cut(bad / name, keep)
        with pytest.raises(CheckpointError, match=name):
            engine.load_adapter(bad)
    engine.save_adapter(src, tmp_path / "meta")
    (tmp_path / "meta" / checkpoint.METADATA_FILE).write_text("{bad")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        engine.load_adapter(tmp_path / "meta")
    assert set(engine.adapters) == {src}


@pytest.mark.parametrize(
    ("keep", "message"),
    [(5, "too short"), (12, "truncated"), (-100, "truncated or corrupt")],
)
def test_a_truncated_model_file_is_a_checkpoint_error(
    tiny_qwen3_dir: Path, tmp_path: Path, keep: int, message: str
) -> None:
    """A cut prefix, a cut header or cut tensor data: each names the file before any
    weight is read (it was a struct, JSON or numpy reshape error)."""
    from tx_engine.loading import load_model

    bad = tmp_path / "model"
    bad.mkdir()
    for f in tiny_qwen3_dir.iterdir():
        if f.is_file():
            (bad / f.name).write_bytes(f.read_bytes())
    weights = bad / "model.safetensors"
    _cut(weights, keep if keep > 0 else weights.stat().st_size + keep)
    with pytest.raises(CheckpointError, match=message) as info:
        load_model(bad)
    assert "model.safetensors" in str(info.value)


def test_peft_export_has_hf_names_layouts_and_config(
    trained: tuple[TrainingEngine, int], tmp_path: Path
) -> None:
    engine, slot = trained
    engine.export_peft(slot, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 4
    assert config["lora_alpha"] == 16.0
    assert config["peft_type"] == "LORA"
    # train_mlp=False: attention projections and lm_head only
    assert config["target_modules"] == ["k_proj", "lm_head", "o_proj", "q_proj", "v_proj"]
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert len(tensors) == 2 * (4 * 2 + 1)  # (q,k,v,o) × 2 layers + lm_head, A and B each
    a = tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    assert a.shape == (4, 128)  # [r, in]
    assert b.shape == (128, 4)  # [out, r] (2 kv heads × head_dim 64)
    ours = dict(checkpoint.named_leaves(engine._lora))
    np.testing.assert_array_equal(
        a, np.asarray(ours["model.layers.1.self_attn.v_proj.lora.lora_a"][slot])[:, :4].T
    )
    # PEFT's delta W^T = (alpha/r)·A^T·B^T equals ours (alpha/r)·a·b, and B was trained
    b_ours = np.asarray(ours["model.layers.1.self_attn.v_proj.lora.lora_b"][slot])[:4]
    np.testing.assert_array_equal(b, b_ours.T)
    assert np.any(b != 0)


def test_merged_export_is_a_base_model_with_the_adapter_baked_in(
    engine: TrainingEngine, tmp_path: Path
) -> None:
    slot = engine.create_adapter(rank=4, seed=12, train_unembed=False)
    try:
        engine.forward_backward([AdapterBatch(slot, data(2, 0))])
        engine.optim_step(slot, AdamParams(1e-2))
        engine.export_merged(slot, tmp_path / "merged")
        merged = TrainingEngine(tmp_path / "merged", CONFIG)
        probe = data(3, 3)
        ours = engine.forward([AdapterBatch(slot, probe)])[0]
        baked = merged.forward([AdapterBatch(None, probe)])[0]
        base = engine.forward([AdapterBatch(None, probe)])[0]
        for a, b, c in zip(ours.outputs, baked.outputs, base.outputs, strict=True):
            np.testing.assert_allclose(b.logprobs, a.logprobs, atol=2e-5)
            assert np.abs(c.logprobs - a.logprobs).max() > 1e-4  # the adapter did change them
        assert (tmp_path / "merged" / "tokenizer.json").is_file()
    finally:
        engine.free_adapter(slot)
