"""Rank buckets and the two LoRA forms: a rank-8 tenant computes at rank 8 whatever the
maximum rank, exactly (outputs and gradients), without a recompile per batch; gather and
concat forms agree with a NumPy oracle and keep a non-finite slot to its own rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tx_engine import batching, step
from tx_engine.config import EngineConfig
from tx_engine.engine import AdamParams, AdapterBatch, DatumArrays, TrainingEngine
from tx_engine.errors import AdapterError
from tx_engine.layers import lora as lora_lib
from tx_engine.layers.linear import LoRALinear, LoRASpec
from tx_engine.layers.lora import (
    LoRAParam,
    lora_modules,
    rank_bucket,
    set_active_rank,
    use_concat,
)
from tx_engine.layers.moe import SparseMoE


def test_rank_bucket_is_the_capped_power_of_two() -> None:
    assert rank_bucket([8], 64) == 8
    assert rank_bucket([5, 3], 64) == 8  # ranks 1-8 share the smallest bucket
    assert rank_bucket([9], 64) == 16
    assert rank_bucket([33], 64) == 64
    assert rank_bucket([9], 12) == 12  # capped at a max rank that is not a power of two
    assert rank_bucket([2], 4) == 4  # a max rank below the smallest bucket
    assert rank_bucket([], 64) == 0  # base rows only: no LoRA term
    assert rank_bucket([0], 64) == 0
    assert rank_bucket([0, 1], 64) == 8
    with pytest.raises(AdapterError, match="max_lora_rank"):
        rank_bucket([65], 64)


def test_use_concat_rule() -> None:
    assert use_concat(64, 1, 5)  # decode
    assert use_concat(16, 4, 5)  # 4·4 = 16: the crossover
    assert not use_concat(8, 16, 5)  # many tokens per row: gather
    assert not use_concat(4, 1, 5)  # fewer rows than slots: gather copies less


# ---------------------------------------------------------------- one layer
RANKS = {1: 2, 2: 3, 3: 8}  # slot → rank; slot 0 is the base (scaling 0)


def make_layer(max_rank: int, seed: int) -> tuple[LoRALinear, dict[str, np.ndarray]]:
    """A 4-slot layer whose slot ``s`` is an exact rank-``RANKS[s]`` LoRA (zeros above)."""
    rng = np.random.default_rng(seed)
    layer = nnx.eval_shape(lambda: LoRALinear(6, 5, axes=("embed", "mlp"), group="mlp",
                           lora=LoRASpec(4, max_rank), dtype=jnp.float32,
                           param_dtype=jnp.float32, rngs=nnx.Rngs(0)))  # fmt: skip
    on = np.zeros((4, max_rank), bool)
    for s, r in RANKS.items():
        on[s, :r] = True
    vals = {
        "w": rng.normal(size=(6, 5)),
        "a": rng.normal(size=(4, 6, max_rank)) * on[:, None, :],
        "b": rng.normal(size=(4, max_rank, 5)) * on[:, :, None],
        "s": np.array([0.0, 0.5, 2.0, 1.5]),
    }
    assert layer.weight is not None
    layer.weight.set_value(jnp.asarray(vals["w"], jnp.float32))
    layer.lora.lora_a.set_value(jnp.asarray(vals["a"], jnp.float32))
    layer.lora.lora_b.set_value(jnp.asarray(vals["b"], jnp.float32))
    layer.lora.lora_scaling.set_value(jnp.asarray(vals["s"], jnp.float32))
    return layer, vals


def oracle(v: dict[str, np.ndarray], x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    a, b, s = v["a"][idx], v["b"][idx], v["s"][idx]
    return np.stack([x[i] @ v["w"] + s[i] * (x[i] @ a[i]) @ b[i] for i in range(len(idx))])


@pytest.mark.parametrize("tokens", [1, 7])  # concat form, gather form
def test_forms_and_ranks_match_oracle_outputs_and_grads(tokens: int) -> None:
    layer, vals = make_layer(16, seed=0)
    rng = np.random.default_rng(1)
    idx = np.array([3, 0, 1, 2, 3, 1])
    x = jnp.asarray(rng.normal(size=(len(idx), tokens, 6)), jnp.float32)
    assert use_concat(len(idx), tokens, 4) == (tokens == 1)

    def loss(m: LoRALinear) -> tuple[jax.Array, jax.Array]:
        y = m(x, jnp.asarray(idx))
        return jnp.sum(jnp.sin(y)), y

    grad_fn = nnx.jit(nnx.value_and_grad(loss, argnums=nnx.DiffState(0, LoRAParam), has_aux=True))
    results = {}
    for rank in (8, 16):  # bucket 8 (the largest rank present) and the full rank
        set_active_rank(layer, rank)
        (_, y), grads = grad_fn(layer)
        np.testing.assert_allclose(y, oracle(vals, np.asarray(x), idx), rtol=1e-5, atol=1e-5)
        results[rank] = (np.asarray(y), grads)
    # Equal up to float32 rounding: the two contractions add the same terms (zeros above rank 8
    # included) in a different order, differently on CPUs with other vector widths (AVX-512:
    # measured ≤ 1.3e-6 of the largest entry), so the bound scales with the largest entry.
    _assert_close_to_scale(results[8][0], results[16][0])
    for g8, g16 in zip(
        jax.tree.leaves(results[8][1]), jax.tree.leaves(results[16][1]), strict=True
    ):
        assert g8.shape == g16.shape
        assert g8.shape[-2:] in ((6, 16), (16, 5))  # the full max rank
        _assert_close_to_scale(g8, g16)
        rank_axis = -1 if g8.shape[-1] == 16 else -2
        assert not np.any(np.take(np.asarray(g8), np.arange(8, 16), axis=rank_axis))
    with pytest.raises(AdapterError, match="active rank"):
        set_active_rank(layer, 17)


def _assert_close_to_scale(got: Any, want: Any) -> None:
    """Equal within 1e-5 of ``want``'s largest magnitude (float32 reordering error)."""
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


def test_concat_keeps_a_non_finite_slot_to_its_own_rows() -> None:
    """NaN in slot 2's B and inf in slot 3's A: rows of slots 0 and 1 stay exact."""
    layer, vals = make_layer(8, seed=2)
    layer.lora.lora_b.set_value(layer.lora.lora_b[...].at[2, 0, 0].set(jnp.nan))
    layer.lora.lora_a.set_value(layer.lora.lora_a[...].at[3, 0, 0].set(jnp.inf))
    idx = np.array([1, 2, 0, 3, 1, 0])
    assert use_concat(len(idx), 1, 4)
    x = np.random.default_rng(3).normal(size=(len(idx), 1, 6))
    y = np.asarray(layer(jnp.asarray(x, jnp.float32), jnp.asarray(idx)))
    healthy = np.isin(idx, [0, 1])
    np.testing.assert_allclose(y[healthy], oracle(vals, x, idx)[healthy], rtol=1e-5, atol=1e-5)
    assert not np.any(np.isfinite(y[idx == 2]))
    assert not np.all(np.isfinite(y[idx == 3]))


def random_moe(rng: np.random.Generator) -> SparseMoE:
    """A MoE block (4 experts, top 2, 3 slots at max rank 4) with random weights and factors;
    slot 0 is the base (scaling 0, as init_adapter leaves it), slots 1 and 2 scale 1.5, 0.7."""
    moe = nnx.eval_shape(lambda: SparseMoE(8, 6, 4, 2, norm_topk_prob=True, lora=LoRASpec(3, 4),
                         dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(1)))  # fmt: skip
    for _, var in nnx.to_flat_state(nnx.state(moe)):
        var.set_value(jnp.asarray(0.5 * rng.standard_normal(var.shape), jnp.float32))
    for _, mod in lora_modules(moe):
        mod.lora_scaling.set_value(jnp.array([0.0, 1.5, 0.7]))
    return moe


def test_moe_experts_compute_at_the_rank_bucket() -> None:
    """Expert LoRA (ragged_dot path) at active rank 2 equals full rank 4 for rank-2 slots."""
    rng = np.random.default_rng(4)
    moe = random_moe(rng)
    for _, mod in lora_modules(moe):  # slots 1, 2 are rank 2: zero columns / rows above
        mod.lora_a.set_value(mod.lora_a[...].at[..., 2:].set(0))
        mod.lora_b.set_value(mod.lora_b[...].at[..., 2:, :].set(0))
    x = jnp.asarray(rng.standard_normal((3, 4, 8)), jnp.float32)
    idx = jnp.array([2, 0, 1])
    run = nnx.jit(lambda m: m(x, idx))  # one compile per rank beats op-by-op dispatch
    set_active_rank(moe, 2)
    low = np.asarray(run(moe))
    set_active_rank(moe, 4)
    np.testing.assert_allclose(low, np.asarray(run(moe)), rtol=1e-6, atol=1e-6)
    assert np.abs(low).max() > 0


def test_rank_zero_leaves_the_lora_terms_out() -> None:
    """Bucket 0 (base rows only): ``x·W`` alone, bit for bit what base rows get with the terms,
    for dense and expert projections."""
    layer, vals = make_layer(8, seed=5)
    x = jnp.asarray(np.random.default_rng(6).normal(size=(3, 7, 6)), jnp.float32)
    base = jnp.zeros(3, jnp.int32)
    set_active_rank(layer, 8)
    with_terms = np.asarray(layer(x, base))
    set_active_rank(layer, 0)
    np.testing.assert_array_equal(np.asarray(layer(x, base)), with_terms)
    np.testing.assert_allclose(with_terms, np.asarray(x) @ vals["w"], rtol=1e-5, atol=1e-5)
    rng = np.random.default_rng(7)
    moe = random_moe(rng)
    xm = jnp.asarray(rng.standard_normal((3, 4, 8)), jnp.float32)
    run = nnx.jit(lambda m: m(xm, base))
    set_active_rank(moe, 4)
    with_terms = np.asarray(run(moe))
    set_active_rank(moe, 0)
    np.testing.assert_array_equal(np.asarray(run(moe)), with_terms)


# ---------------------------------------------------------------- the engine
def sft_groups(slots: list[int], seed: int) -> list[AdapterBatch]:
    rng = np.random.default_rng(seed)
    groups = []
    for s in slots:
        data = []
        for _ in range(2):
            seq = rng.integers(5, 2000, 13)
            data.append(DatumArrays(seq[:-1].astype(np.int32), {"target_tokens": seq[1:]}))
        groups.append(AdapterBatch(s, data))
    return groups


def packed(
    engine: TrainingEngine, groups: list[AdapterBatch], index: dict[Any, int] | None = None
) -> dict[str, Any]:
    """The one micro-batch the engine would build for ``groups`` (same packing code);
    ``index`` maps group slots to adapter slots (default: the allocated adapters)."""
    index = {s: s for s in engine.adapters} if index is None else index
    rows = batching.validate(groups, engine.vocab_size, index)
    (mb_rows,) = batching.plan(rows, engine.config)
    arrays = batching.pack(mb_rows, engine.config, lora_lib.BASE_SLOT).arrays
    return jax.tree.map(jnp.asarray, dict(arrays))


def test_engine_runs_rank_8_tenants_at_rank_8(tiny_qwen3_dir: Path) -> None:
    cfg = EngineConfig(
        max_lora_adapters=3, max_lora_rank=64, batch_buckets=(8,), logits_chunk_tokens=32
    )
    engine = TrainingEngine(tiny_qwen3_dir, cfg)
    slots = [engine.create_adapter(rank=8, seed=1), engine.create_adapter(rank=5, seed=2)]
    engine.forward_backward(sft_groups(slots, seed=0))
    engine.optim_steps({s: AdamParams(1e-2) for s in slots})  # B ≠ 0: every factor matters
    gd8 = engine.graphdef_for_slots([0, *slots])
    assert gd8 is engine.graphdef_for_slots(slots[:1])  # cached: one graphdef per bucket
    assert {m.active_rank for _, m in lora_lib.lora_modules(nnx.merge(gd8.graphdef, engine._lora, engine._rest))} == {8}  # fmt: skip
    # Base rows only: no LoRA terms (bucket 0), the same values bit for bit; a sampling run
    # that adapters may join keeps them.
    gd0 = engine.graphdef_for_slots([0])
    assert {m.active_rank for _, m in lora_lib.lora_modules(nnx.merge(gd0.graphdef, engine._lora, engine._rest))} == {0}  # fmt: skip
    assert engine.graphdef_for_slots([0], keep_lora=True) is gd8
    base_batch = packed(engine, sft_groups([None], seed=9), {None: 0})  # type: ignore[list-item]
    without = step.forward(gd0, engine._lora, engine._rest, base_batch, "cross_entropy", 32)
    with_terms = step.forward(gd8, engine._lora, engine._rest, base_batch, "cross_entropy", 32)
    np.testing.assert_array_equal(without.logprobs, with_terms.logprobs)

    batch = packed(engine, sft_groups(slots, seed=1))
    args = (engine._lora, engine._rest)
    zeros = step.zeros_like_state(engine._lora)
    out8, g8 = step.forward_backward(gd8, *args, zeros, batch, "cross_entropy", 32)
    zeros = step.zeros_like_state(engine._lora)
    out64, g64 = step.forward_backward(engine._graphdef, *args, zeros, batch, "cross_entropy", 32)
    np.testing.assert_allclose(out8.elementwise_loss, out64.elementwise_loss, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g64), strict=True):
        assert a.shape == b.shape  # full max-rank gradients: optimizer state is untouched
        # Same math; only float32 summation order differs (contractions over 8 vs 64 ranks).
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert max(float(np.abs(np.asarray(a)).max()) for a in jax.tree.leaves(g8)) > 0

    def flops(gd: Any) -> float:
        lowered = step.forward_backward.lower(gd, *args, zeros, batch, "cross_entropy", 32)
        cost = lowered.cost_analysis()
        return float((cost[0] if isinstance(cost, list) else cost)["flops"])

    f8, f64 = flops(gd8), flops(engine._graphdef)
    assert f8 < 0.8 * f64, (f8, f64)

    # A new batch in the same bucket (ranks 7 and 2 → 8) reuses the program; 16 is a new one.
    engine.free_adapter(slots[1])
    third = engine.create_adapter(rank=7, seed=3)
    engine.forward_backward(sft_groups(slots[:1], seed=2))  # compiles bucket 8 via the engine
    traces = step.TRACE_COUNTS["forward_backward"]
    engine.forward_backward(sft_groups([slots[0], third], seed=3))
    assert step.TRACE_COUNTS["forward_backward"] == traces
    engine.free_adapter(third)
    low = engine.create_adapter(rank=2, seed=4)
    engine.forward_backward(sft_groups([low], seed=4))
    assert step.TRACE_COUNTS["forward_backward"] == traces
    engine.free_adapter(low)
    high = engine.create_adapter(rank=16, seed=5)
    engine.forward_backward(sft_groups([high, slots[0]], seed=5))
    assert step.TRACE_COUNTS["forward_backward"] == traces + 1
