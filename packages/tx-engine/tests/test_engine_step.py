"""The jitted programs: no recompilation inside buckets, gradients vs finite differences."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from tx_engine import batching, step
from tx_engine.config import EngineConfig
from tx_engine.engine import AdamParams, AdapterBatch, DatumArrays, TrainingEngine
from tx_engine.errors import ConfigError

CONFIG = EngineConfig(
    max_lora_adapters=4, max_lora_rank=8, batch_buckets=(8,), logits_chunk_tokens=32
)


def data(n: int, length: int, seed: int) -> list[DatumArrays]:
    rng = np.random.default_rng(seed)
    return [
        DatumArrays(rng.integers(5, 2000, length), {"target_tokens": rng.integers(5, 2000, length)})
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def engine(tiny_qwen3_dir: Path) -> TrainingEngine:
    return TrainingEngine(tiny_qwen3_dir, CONFIG)


def test_bucket_rounding() -> None:
    assert [batching.bucket(n, (), 16) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]
    assert [batching.bucket(n, ()) for n in (1, 2, 3, 5)] == [1, 2, 4, 8]
    assert [batching.bucket(n, (8, 24)) for n in (1, 8, 9, 24, 25, 49)] == [8, 8, 24, 24, 48, 72]


def test_engine_config_rejects_bad_values_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="max_lora_rank"):
        EngineConfig(max_lora_rank=0)
    with pytest.raises(ConfigError, match="seq_len_buckets"):
        EngineConfig(seq_len_buckets=(32, 16))
    with pytest.raises(ConfigError, match="dtype"):
        EngineConfig(dtype="int8")
    with pytest.raises(ConfigError, match="logits_chunk_tokens"):
        EngineConfig(logits_chunk_tokens=-1)


def test_plan_keeps_every_micro_batch_within_the_token_budget() -> None:
    config = EngineConfig(tokens_per_micro_batch=256, batch_buckets=(1, 2, 4, 8))
    rng = np.random.default_rng(0)
    groups = [AdapterBatch(1, data(1, int(n), int(n))) for n in rng.integers(1, 100, 40)]
    groups.append(AdapterBatch(1, data(1, 300, 0)))  # longer than the budget: alone
    rows = batching.validate(groups, 2112, {1: 1})
    batches = batching.plan(rows, config)
    assert sorted((r.group, r.index) for b in batches for r in b) == [(g, 0) for g in range(41)]
    for mb in batches:
        packed = batching.pack(mb, config, 0).arrays["input_ids"]
        assert isinstance(packed, np.ndarray)
        assert packed.size <= 256 or len(mb) == 1
        assert packed.shape[1] in (16, 32, 64, 128, 512)


def test_new_sizes_inside_buckets_and_new_hyperparameters_do_not_recompile(
    engine: TrainingEngine,
) -> None:
    a = engine.create_adapter(rank=8, seed=0)
    b = engine.create_adapter(rank=4, seed=1)
    engine.forward_backward([AdapterBatch(a, data(3, 10, 0))])
    engine.forward([AdapterBatch(a, data(3, 10, 0))])
    engine.optim_step(a, AdamParams(1e-3))
    before = dict(step.TRACE_COUNTS)
    engine.forward_backward([AdapterBatch(a, data(7, 15, 1)), AdapterBatch(b, data(1, 3, 2))])
    engine.forward([AdapterBatch(b, data(5, 16, 3)), AdapterBatch(None, data(2, 4, 4))])
    engine.optim_step(
        b, AdamParams(5e-2, beta1=0.5, beta2=0.9, eps=1e-8, weight_decay=0.1, grad_clip_norm=1.0)
    )
    engine.optim_steps({a: AdamParams(1e-4), b: AdamParams(2e-4)})
    engine.free_adapter(b)
    c = engine.create_adapter(rank=2, seed=3)
    engine.forward_backward([AdapterBatch(c, data(2, 9, 5))])
    assert dict(step.TRACE_COUNTS) == before
    # loss-config values are traced too: two PPO configs, one new program (the counter is live)
    for lo, hi in ((0.7, 1.3), (0.9, 1.1)):
        rl = [
            DatumArrays(
                d.input_tokens,
                {
                    **d.loss_fn_inputs,
                    "logprobs": np.full(12, -3.0),
                    "advantages": np.linspace(-1, 1, 12),
                },
            )
            for d in data(2, 12, 8)
        ]
        cfg = {"clip_low_threshold": lo, "clip_high_threshold": hi}
        engine.forward([AdapterBatch(c, rl, loss_fn="ppo", loss_fn_config=cfg)])
    assert step.TRACE_COUNTS["forward"] == before["forward"] + 1
    assert step.TRACE_COUNTS["forward_backward"] == before["forward_backward"]
    for slot in list(engine.adapters):
        engine.free_adapter(slot)


def _perturbed(tree: object, leaf_index: int, idx: tuple[int, ...], delta: float) -> object:
    leaves, treedef = jax.tree.flatten(tree)
    leaves[leaf_index] = leaves[leaf_index].at[idx].add(delta)
    return jax.tree.unflatten(treedef, leaves)


def test_gradient_matches_central_finite_differences(engine: TrainingEngine) -> None:
    slot = engine.create_adapter(rank=8, seed=4)
    warm = data(2, 12, 8)
    engine.forward_backward([AdapterBatch(slot, warm)])
    engine.optim_step(slot, AdamParams(1e-2))  # B factors non-zero, so A has a gradient too
    batch_data = [
        DatumArrays(d.input_tokens, {**d.loss_fn_inputs, "weights": w})
        for d, w in zip(data(2, 8, 9), (np.full(8, 0.5), np.linspace(-1, 1, 8)), strict=True)
    ]
    engine.forward_backward([AdapterBatch(slot, batch_data)])
    grads = jax.tree.leaves(engine._grads)
    rows = batching.validate([AdapterBatch(slot, batch_data)], engine.vocab_size, {slot: slot})
    arrays = batching.pack(rows, CONFIG, 0).arrays
    batch = jax.tree.map(np.asarray, arrays)

    def loss_at(lora: object) -> float:
        out = step.forward(engine._graphdef, lora, engine._rest, batch, loss_fn="cross_entropy")
        return float(np.asarray(out.metrics["loss:sum"], np.float64).sum())

    checked = 0
    for i, leaf in enumerate(jax.tree.leaves(engine._lora)):
        if i % 5:  # a spread of factors (a and b, attention, mlp, unembed) keeps this fast
            continue
        g_slot = np.asarray(grads[i][slot])
        idx = (slot, *np.unravel_index(np.argmax(np.abs(g_slot)), g_slot.shape))
        eps = 1e-2 * max(1.0, float(abs(leaf[idx])))
        plus = loss_at(_perturbed(engine._lora, i, idx, eps))
        minus = loss_at(_perturbed(engine._lora, i, idx, -eps))
        fd = (plus - minus) / (2 * eps)
        assert fd == pytest.approx(float(grads[i][idx]), rel=2e-2, abs=2e-3), (i, idx)
        checked += 1
    assert checked >= 3
    engine.free_adapter(slot)
