"""Multi-tenant LoRA: oracles for one layer and for the expert layer, mixed-tenant batches,
slot lifecycle (init → base logits, clear → reset), rank padding and gradients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tx_engine.errors import AdapterError
from tx_engine.layers.linear import LoRALinear, LoRASpec
from tx_engine.layers.lora import (
    LoRAParam,
    LoRAScaling,
    clear_adapter,
    init_adapter,
    lora_modules,
)
from tx_engine.layers.moe import SparseMoE
from tx_engine.loading import load_model

GOLDENS = Path(__file__).parent / "goldens"


@nnx.jit
def _forward(model: Any, ids: Any, pos: Any, mask: Any, slots: Any) -> jax.Array:
    hidden = model(ids, positions_bt=pos, attention_mask_bt=mask, adapter_indices_b=slots)
    return model.compute_logits(hidden, slots)


def logits(model: Any, batch: dict[str, np.ndarray], slots: list[int]) -> np.ndarray:
    args = (batch["input_ids"], batch["position_ids"], batch["attention_mask"], np.array(slots))
    return np.asarray(_forward(model, *(jnp.asarray(x) for x in args)))


def golden_batch(arch: str) -> dict[str, np.ndarray]:
    z = np.load(GOLDENS / arch / "logits.npz")
    return {k.removeprefix("b0_"): z[k] for k in z.files if k.startswith("b0_")}


def row(batch: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    return {k: v[i : i + 1] if v.ndim else v for k, v in batch.items()}


def randomise_b(model: Any, slot: int, seed: int) -> None:
    """Fresh adapters have B = 0 (no effect); give B values so the adapter is visible."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, LoRAParam)):
        if path[-1] == "lora_b":
            rank_on = np.any(np.asarray(nnx_slot(model, path[:-1]).lora_a[...][slot]) != 0, axis=-2)
            value = np.array(var[...])
            value[slot] = 0.1 * rng.standard_normal(var.shape[1:]) * rank_on[..., :, None]
            var.set_value(jnp.asarray(value))


def nnx_slot(model: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        model = model[p] if isinstance(p, int) else getattr(model, p)
    return model


def copy_slot(src: Any, src_slot: int, dst: Any, dst_slot: int) -> None:
    """Copy one adapter between models (max ranks may differ; extra rank columns must be 0)."""
    for (_, s), (_, d) in zip(lora_modules(src), lora_modules(dst), strict=True):
        r = d.lora_a.shape[-1]
        assert not np.any(np.asarray(s.lora_a[...][src_slot])[..., r:])
        d.lora_a[...] = d.lora_a[...].at[dst_slot].set(s.lora_a[...][src_slot][..., :r])
        d.lora_b[...] = d.lora_b[...].at[dst_slot].set(s.lora_b[...][src_slot][..., :r, :])
        d.lora_scaling[...] = d.lora_scaling[...].at[dst_slot].set(s.lora_scaling[...][src_slot])


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---------------------------------------------------------------- single-layer oracles
def test_lora_linear_matches_numpy_oracle() -> None:
    rng = np.random.default_rng(0)
    layer = nnx.eval_shape(lambda: LoRALinear(6, 5, axes=("embed", "mlp"), group="mlp", lora=LoRASpec(3, 4),
                       dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))  # fmt: skip
    w, a, b = rng.normal(size=(6, 5)), rng.normal(size=(3, 6, 4)), rng.normal(size=(3, 4, 5))
    s = np.array([0.0, 0.5, 2.0])
    assert layer.weight is not None
    layer.weight.set_value(jnp.asarray(w, jnp.float32))
    layer.lora.lora_a.set_value(jnp.asarray(a, jnp.float32))
    layer.lora.lora_b.set_value(jnp.asarray(b, jnp.float32))
    layer.lora.lora_scaling.set_value(jnp.asarray(s, jnp.float32))
    x = rng.normal(size=(4, 3, 6))
    idx = np.array([0, 2, 1, 2])
    ours = np.asarray(layer(jnp.asarray(x, jnp.float32), jnp.asarray(idx)))
    expected = np.stack([x[i] @ w + s[idx[i]] * (x[i] @ a[idx[i]]) @ b[idx[i]] for i in range(4)])
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def topk_mask(moe: SparseMoE, x_btd: jax.Array) -> np.ndarray:
    """Bool ``[M, E]`` of each token's top-k experts, chosen by NumPy (outside any trace)."""
    x_md = np.asarray(x_btd).reshape(-1, x_btd.shape[-1])
    logits = x_md @ np.asarray(moe.gate.weight[...])
    top = np.argsort(-logits, axis=-1, kind="stable")[:, : moe.top_k]
    sel = np.zeros(logits.shape, bool)
    np.put_along_axis(sel, top, True, axis=-1)
    return sel


def moe_oracle(moe: SparseMoE, x_btd: jax.Array, idx_b: jax.Array, sel_me: np.ndarray) -> jax.Array:
    """Dense reference: every expert on every token, then the renormalised top-k mix; each
    token's LoRA factors gathered by its row's adapter (no sorting, no ragged_dot)."""
    b, t, d = x_btd.shape
    x_md = x_btd.reshape(b * t, d)
    a_m = jnp.repeat(idx_b, t)
    probs_me = jax.nn.softmax(x_md @ moe.gate.weight[...], axis=-1)
    w_me = jnp.where(sel_me, probs_me, 0.0)
    w_me = w_me / w_me.sum(-1, keepdims=True)

    def proj(name: str, v_med: jax.Array) -> jax.Array:
        p = moe.experts[name]
        a, bb = p.lora.lora_a[...][a_m], p.lora.lora_b[...][a_m]
        s = p.lora.lora_scaling[...][a_m][:, None, None]
        xa = jnp.einsum("med,medr->mer", v_med, a)
        return jnp.einsum("med,edf->mef", v_med, p.weight[...]) + s * jnp.einsum(
            "mer,merf->mef", xa, bb
        )

    v_med = jnp.broadcast_to(x_md[:, None], (b * t, moe.num_experts, d))
    h_mef = jax.nn.silu(proj("gate_proj", v_med)) * proj("up_proj", v_med)
    return jnp.einsum("me,med->md", w_me, proj("down_proj", h_mef)).reshape(b, t, d)


def test_moe_lora_and_grads_match_dense_oracle() -> None:
    moe = nnx.eval_shape(lambda: SparseMoE(8, 6, 4, 2, norm_topk_prob=True, lora=LoRASpec(3, 2),
                    dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(1)))  # fmt: skip
    rng = np.random.default_rng(2)  # NumPy draws: no per-shape compiles of eager jax.random
    for _, var in nnx.to_flat_state(nnx.state(moe)):
        var.set_value(jnp.asarray(0.5 * rng.standard_normal(var.shape), jnp.float32))
    for _, mod in lora_modules(moe):
        mod.lora_scaling.set_value(jnp.array([0.0, 1.5, 0.7]))
    x = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32)
    idx = jnp.array([2, 1])
    sel = topk_mask(moe, x)
    lora_only = nnx.DiffState(0, LoRAParam)

    def out_and_grad(fn: Any) -> tuple[jax.Array, Any]:
        """One jitted forward+backward (compiling beats op-by-op dispatch of the dense oracle)."""

        def loss(m: SparseMoE) -> tuple[jax.Array, jax.Array]:
            out = fn(m)
            return jnp.sum(jnp.sin(out)), out

        vg = nnx.value_and_grad(loss, argnums=lora_only, has_aux=True)
        (_, out), grads = nnx.jit(vg)(moe)
        return out, grads

    ours, grads = out_and_grad(lambda m: m(x, idx))
    expected, ref = out_and_grad(lambda m: moe_oracle(m, x, idx, sel))
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
        assert not np.any(np.asarray(g)[0])  # slot 0 (base) never gets a gradient
    assert all(np.abs(np.asarray(g)[1:]).max() > 0 for g in jax.tree.leaves(grads))


# ---------------------------------------------------------------- whole-model behaviour
@pytest.fixture(scope="module")
def dense() -> Any:
    return load_model(GOLDENS / "qwen3", max_lora_adapters=3, max_lora_rank=4)[0]


def test_mixed_tenants_and_base_rows_match_rows_run_alone() -> None:
    """Rows of a rank-2 tenant, a rank-4 tenant (with lm_head LoRA) and the base model in one
    MoE batch equal each row run alone in a model holding only its adapter; base rows equal
    the transformers logits. ("Alone" batches repeat the row 3x so one compilation serves
    all calls; the rows of such a batch are identical, so no other tenant is present.)"""
    multi, _ = load_model(GOLDENS / "qwen3_moe", max_lora_adapters=3, max_lora_rank=4)
    init_adapter(multi, 1, rank=2, alpha=4.0, seed=10)
    init_adapter(multi, 2, rank=4, alpha=8.0, seed=11, train_unembed=True)
    randomise_b(multi, 1, seed=12)
    randomise_b(multi, 2, seed=13)
    batch, slots = golden_batch("qwen3_moe"), [2, 0, 1]
    mixed = logits(multi, batch, slots)
    for i, slot in enumerate(slots):
        valid = batch["attention_mask"][i].astype(bool)
        if slot == 0:
            assert rel(mixed[i][valid], batch["logits"][i][valid]) <= 1e-4
            continue
        single, _ = load_model(GOLDENS / "qwen3_moe", max_lora_adapters=3, max_lora_rank=4)
        copy_slot(multi, slot, single, 1)
        alone = logits(single, {k: np.repeat(row(batch, i)[k], 3, axis=0) if batch[k].ndim else batch[k] for k in batch}, [1, 1, 1])  # fmt: skip
        assert rel(mixed[i][valid], alone[0][valid]) < 1e-5
        assert rel(mixed[i][valid], batch["logits"][i][valid]) > 1e-2  # the adapter acts


def test_fresh_adapter_is_base_and_clear_resets(dense: Any) -> None:
    batch = golden_batch("qwen3")
    base = logits(dense, batch, [0, 0, 0])
    init_adapter(dense, 1, rank=3, alpha=6.0, seed=0, train_unembed=True)
    np.testing.assert_array_equal(logits(dense, batch, [1, 0, 1]), base)
    randomise_b(dense, 1, seed=1)
    assert rel(logits(dense, batch, [1, 1, 1]), base) > 1e-2
    clear_adapter(dense, 1)
    np.testing.assert_array_equal(logits(dense, batch, [1, 0, 1]), base)
    for var in jax.tree.leaves(nnx.state(dense, LoRAParam, LoRAScaling)):
        assert not np.any(np.asarray(var))


def test_rank_padding_is_exact(dense: Any) -> None:
    """A rank-2 adapter in a max-rank-4 slot equals the same adapter in a max-rank-2 model."""
    init_adapter(dense, 2, rank=2, alpha=3.0, seed=5, train_unembed=True)
    randomise_b(dense, 2, seed=6)
    small, _ = load_model(GOLDENS / "qwen3", max_lora_adapters=3, max_lora_rank=2)
    copy_slot(dense, 2, small, 2)
    batch = golden_batch("qwen3")
    np.testing.assert_allclose(
        logits(dense, batch, [2, 2, 2]), logits(small, batch, [2, 2, 2]), rtol=1e-5, atol=1e-5
    )
    clear_adapter(dense, 2)


def test_init_adapter_values_targets_and_errors(dense: Any) -> None:
    init_adapter(dense, 1, rank=3, alpha=6.0, seed=7, train_attn=False)
    for _, mod in lora_modules(dense):
        a = np.asarray(mod.lora_a[...][1])
        on = mod.group == "mlp"
        assert float(mod.lora_scaling[...][1]) == (2.0 if on else 0.0)
        assert not np.any(np.asarray(mod.lora_b[...][1]))
        assert not np.any(a[..., 3:])
        if on:
            bound = 1 / np.sqrt(mod.d_in)
            assert np.all(np.abs(a[..., :3]) <= bound)
            assert np.abs(a[..., :3]).max() > bound / 2
        else:
            assert not np.any(a)
    first = np.asarray(dense.model.layers[0].mlp.up_proj.lora.lora_a[...][1])
    init_adapter(dense, 1, rank=3, alpha=6.0, seed=7, train_attn=False)
    again = np.asarray(dense.model.layers[0].mlp.up_proj.lora.lora_a[...][1])
    np.testing.assert_array_equal(first, again)
    init_adapter(dense, 1, rank=3, alpha=6.0, seed=8, train_attn=False)
    assert not np.array_equal(first, dense.model.layers[0].mlp.up_proj.lora.lora_a[...][1])
    for bad in ({"slot": 0}, {"slot": 3}, {"rank": 0}, {"rank": 5}, {"alpha": 0.0}):
        kwargs = {"slot": 1, "rank": 2, "alpha": 1.0, "seed": 0} | bad
        with pytest.raises(AdapterError, match=next(iter(bad))):
            init_adapter(dense, kwargs.pop("slot"), **kwargs)
    clear_adapter(dense, 1)


@pytest.mark.slow
def test_remat_gives_identical_lora_gradients() -> None:
    batch = golden_batch("qwen3")
    grads = []
    for remat in (False, True):
        model, _ = load_model(GOLDENS / "qwen3", max_lora_adapters=2, max_lora_rank=2, remat=remat)
        init_adapter(model, 1, rank=2, alpha=2.0, seed=0, train_unembed=True)
        randomise_b(model, 1, seed=1)

        def loss(m: Any) -> jax.Array:
            slots = jnp.array([1, 0, 1])
            ids, pos, mask = (jnp.asarray(batch[k]) for k in ("input_ids", "position_ids", "attention_mask"))  # fmt: skip
            h = m(ids, positions_bt=pos, attention_mask_bt=mask, adapter_indices_b=slots)
            return jnp.mean(jax.nn.log_softmax(m.compute_logits(h, slots))[..., 7])

        g = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, LoRAParam)))(model)
        grads.append(jax.tree.leaves(g))
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert any(np.abs(np.asarray(a)[1]).max() > 0 for a in grads[0])
