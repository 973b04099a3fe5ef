"""Memory levers of a training step keep its results: causal query blocks in attention,
per-layer rematerialisation through the engine, and token-budget micro-batching."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tx_engine import batching
from tx_engine.config import EngineConfig
from tx_engine.engine import AdamParams, AdapterBatch, DatumArrays, TrainingEngine
from tx_engine.layers.attention import Attention, attention_mask_btS, query_block
from tx_engine.layers.linear import LoRASpec

GOLDEN_QWEN3 = Path(__file__).parent / "goldens" / "qwen3"


def test_query_block_sizes() -> None:
    assert query_block(128) == 0  # one block: the full square
    assert query_block(255) == 0
    assert query_block(256) == query_block(512) == 128
    assert query_block(4096) == 256  # at most 16 unrolled blocks
    assert query_block(384) == 128
    assert query_block(300) == 0  # not a multiple of the block


def _attention() -> Attention:
    return Attention(
        32, 4, 2, 16, qk_norm_eps=None, use_bias=False, lora=LoRASpec(2, 4),
        dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0),
    )  # fmt: skip


def test_causal_blocks_match_the_full_square_values_gradients_and_save_memory() -> None:
    attn = _attention()
    b, t = 1, 512
    rng = np.random.default_rng(0)
    q, k, v, w = (
        jnp.asarray(rng.standard_normal((b, t, heads, 16)), jnp.float32) for heads in (4, 2, 2, 4)
    )
    mask = jnp.ones((b, t), bool).at[0, 300:].set(False)  # right padding, as training packs
    visible = attention_mask_btS(mask, 0, t)

    def loss(q: Any, k: Any, v: Any, blocks: bool) -> Any:
        return jnp.sum(attn._attend(q, k, v, visible, causal_blocks=blocks) * w)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    full_fn, blocked_fn = (grad.lower(q, k, v, blocks).compile() for blocks in (False, True))
    (full, g_full), (blocked, g_blocked) = full_fn(q, k, v), blocked_fn(q, k, v)
    np.testing.assert_allclose(blocked, full, rtol=1e-5)
    for a, c in zip(g_blocked, g_full, strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5)
    temp = [int(f.memory_analysis().temp_size_in_bytes) for f in (full_fn, blocked_fn)]
    assert temp[1] < 0.75 * temp[0]  # no stored [B, H, T, T] probabilities


def sft(slot: int, lengths: list[int], seed: int) -> AdapterBatch:
    rng = np.random.default_rng(seed)
    data = []
    for n in lengths:
        seq = rng.integers(3, 290, n + 1)
        data.append(DatumArrays(seq[:-1].astype(np.int32), {"target_tokens": seq[1:]}))
    return AdapterBatch(slot, data)


def _train(config: EngineConfig, groups_of: Any) -> tuple[list[Any], list[np.ndarray]]:
    engine = TrainingEngine(GOLDEN_QWEN3, config)
    slots = [engine.create_adapter(rank=4, seed=1), engine.create_adapter(rank=8, seed=2)]
    engine.forward_backward(groups_of(slots, 0))
    engine.optim_steps({s: AdamParams(1e-2) for s in slots})  # B ≠ 0: every factor matters
    outs = engine.forward_backward(groups_of(slots, 1))
    return outs, [np.asarray(g) for g in jax.tree.leaves(engine._grads)]


def _assert_same(a: tuple[list[Any], list[np.ndarray]], b: Any) -> None:
    for ga, gb in zip(a[0], b[0], strict=True):
        assert ga.metrics["loss:sum"] == pytest.approx(gb.metrics["loss:sum"], rel=1e-5)
        for da, db in zip(ga.outputs, gb.outputs, strict=True):
            np.testing.assert_allclose(da.logprobs, db.logprobs, rtol=1e-5, atol=1e-5)
    # Gradients are sums over tokens; micro-batching reorders them, so float32 rounding scales
    # with each array's largest entries (measured: ≤ 2.3e-6 of max|g|, on an AVX-512 CPU),
    # and small entries of a large array can miss a per-element 1e-4 relative bound.
    for x, y in zip(a[1], b[1], strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(y).max())))
    assert max(float(np.abs(x).max()) for x in a[1]) > 0


def _groups(slots: list[int], seed: int) -> list[AdapterBatch]:
    return [sft(slots[0], [30, 9], seed), sft(slots[1], [17], seed + 10)]


BASE = EngineConfig(max_lora_adapters=2, max_lora_rank=8, tokens_per_micro_batch=4096)


def test_micro_batches_give_the_single_call_results() -> None:
    # 32 padded tokens per call: the two 32-token rows go alone, the 16-token one alone too
    split = EngineConfig(**{**BASE.__dict__, "tokens_per_micro_batch": 32})
    _assert_same(_train(split, _groups), _train(BASE, _groups))


@pytest.mark.slow
def test_remat_through_the_engine_gives_the_plain_results() -> None:
    # the engine used to fail here with "Cannot mutate Param from a different trace level"
    remat = EngineConfig(**{**BASE.__dict__, "remat": True})
    _assert_same(_train(remat, _groups), _train(BASE, _groups))


def test_default_budget_splits_8x512_into_micro_batches() -> None:
    config = EngineConfig()
    rows = batching.validate([sft(1, [512] * 8, 0)], 300, {1: 1})
    plan = batching.plan(rows, config)
    assert [len(mb) for mb in plan] == [4, 4]
