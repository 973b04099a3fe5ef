"""`step.full_train_step` (full fine-tuning, `tx train`): its gradient and its compilation.

Two independent checks of the gradient on the tiny Qwen3:

* against the LoRA path — for ``y = x·W + s·(x·A)·B`` every row in slot 1 gives
  ``∂L/∂B = s·Aᵀ·∂L/∂W`` exactly, so :func:`tx_engine.step.forward_backward`'s adapter gradient
  pins the full gradient of every projection weight (attention and MLP, all layers);
* against central finite differences of :func:`tx_engine.step.forward` along a random
  direction in the weights the identity does not reach (embedding, norms).

The gradient is read out with an optax transformation that stores it as its state, so the test
sees exactly what the optimizer receives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tx_engine import batching, step
from tx_engine.config import EngineConfig
from tx_engine.engine import AdapterBatch, DatumArrays
from tx_engine.layers import lora as lora_lib
from tx_engine.loading import load_model

RANK, ALPHA = 4, 8.0
SLOT = 1
LR = 1e-3  # the loss is a sum over ~20 weighted tokens: small steps


def _record_grads() -> optax.GradientTransformation:
    """Zero updates; the new state *is* the gradient (exposes what an optimizer is given)."""

    def init(params: Any) -> Any:
        return jax.tree.map(jnp.zeros_like, params)

    def update(grads: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        return jax.tree.map(jnp.zeros_like, grads), grads

    return optax.GradientTransformation(init, update)


RECORD = _record_grads()  # one object: jit keys the compiled step on it


def _flat(state: Any) -> dict[tuple[Any, ...], np.ndarray]:
    return {
        path: np.asarray(v[...] if isinstance(v, nnx.Variable) else v)
        for path, v in nnx.to_flat_state(state)
    }


def _copy(state: Any) -> Any:
    return jax.tree.map(jnp.copy, state)  # full_train_step donates its params and opt_state


@pytest.fixture(scope="module")
def setup(tiny_qwen3_dir: Path) -> tuple[Any, dict[str, Any]]:
    model, config = load_model(tiny_qwen3_dir, max_lora_adapters=2, max_lora_rank=RANK)
    lora_lib.init_adapter(model, SLOT, rank=RANK, alpha=ALPHA, seed=3)
    rng = np.random.default_rng(0)
    data = [
        DatumArrays(
            rng.integers(0, config.vocab_size, n),
            {
                "target_tokens": rng.integers(0, config.vocab_size, n),
                "weights": rng.random(n).astype(np.float32),
            },
        )
        for n in (7, 12, 3)
    ]
    rows = batching.validate([AdapterBatch(SLOT, data)], config.vocab_size, {SLOT: SLOT})
    batch = batching.pack(rows, EngineConfig(), lora_lib.BASE_SLOT).arrays
    return model, jax.tree.map(jnp.asarray, batch)


def _full_grads(model: Any, batch: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    new_params, grads, loss = step.full_train_step(
        graphdef, _copy(params), rest, RECORD.init(params), batch, tx=RECORD
    )
    return graphdef, rest, (params, new_params), (grads, loss)


def test_projection_gradients_match_the_lora_identity(setup: tuple[Any, Any]) -> None:
    model, batch = setup
    _, _, (params, new_params), (grads, loss) = _full_grads(model, batch)
    graphdef_l, lora, rest_l = nnx.split(model, lora_lib.LoRAParam, ...)
    outputs, lora_grads = step.forward_backward(
        graphdef_l, lora, rest_l, step.zeros_like_state(lora), batch, "cross_entropy"
    )
    assert float(loss) == pytest.approx(float(outputs.metrics["loss:sum"].sum()), rel=1e-6)
    full, factors, lgrads = _flat(grads), _flat(lora), _flat(lora_grads)
    for path, value in _flat(new_params).items():  # zero updates leave the weights alone
        np.testing.assert_array_equal(value, _flat(params)[path])
    checked = 0
    for path in lgrads:
        if path[-1] != "lora_b" or (*path[:-2], "weight") not in full:
            continue  # the tied lm_head reuses the embedding: no weight of its own
        g_w = full[(*path[:-2], "weight")]
        a = factors[(*path[:-1], "lora_a")][SLOT]
        expected = (ALPHA / RANK) * a.T @ g_w
        # float32 sums over tokens and D_in: absolute error relative to the largest entry
        atol = 2e-5 * float(np.abs(expected).max())
        np.testing.assert_allclose(lgrads[path][SLOT], expected, rtol=2e-4, atol=atol)
        assert np.abs(g_w).max() > 0
        checked += 1
    assert checked == 2 * 7  # q, k, v, o, gate, up, down in both layers


def test_embedding_and_norm_gradients_match_finite_differences(setup: tuple[Any, Any]) -> None:
    model, batch = setup
    graphdef, rest, (params, _), (grads, _) = _full_grads(model, batch)
    rng = np.random.default_rng(1)
    keep = ("embed_tokens", "norm", "input_layernorm", "q_norm")

    def direction(path: Any, x: Any) -> Any:
        names = [getattr(k, "key", None) for k in path]
        on = any(k in names for k in keep)
        return jnp.asarray(rng.standard_normal(x.shape) * on, x.dtype)

    d = jax.tree_util.tree_map_with_path(direction, params)
    norm = float(jnp.sqrt(sum(jnp.vdot(u, u) for u in jax.tree.leaves(d))))
    d = jax.tree.map(lambda u: u / norm, d)  # a unit step: eps is the distance moved
    eps = 1e-2

    def loss_at(sign: float) -> float:
        shifted = jax.tree.map(lambda p, u: p + sign * eps * u, params, d)
        out = step.forward(graphdef, shifted, rest, batch, "cross_entropy")
        return float(out.metrics["loss:sum"].sum())

    numeric = (loss_at(1.0) - loss_at(-1.0)) / (2 * eps)
    analytic = sum(
        float(jnp.vdot(g, u))
        for g, u in zip(jax.tree.leaves(grads), jax.tree.leaves(d), strict=True)
    )
    assert abs(analytic) > 1e-2
    assert numeric == pytest.approx(analytic, rel=1e-2)


def test_sgd_step_moves_weights_by_the_gradient_and_compiles_once(
    setup: tuple[Any, Any],
) -> None:
    model, batch = setup
    graphdef, rest, (params, _), (grads, loss) = _full_grads(model, batch)
    sgd = optax.sgd(LR)
    state = sgd.init(params)
    before = step.TRACE_COUNTS["full_train_step"]
    moved, state, loss_1 = step.full_train_step(graphdef, _copy(params), rest, state, batch, sgd)
    assert float(loss_1) == pytest.approx(float(loss), rel=1e-6)
    for path, value in _flat(moved).items():
        expected = _flat(params)[path] - LR * _flat(grads)[path]
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-7, err_msg=str(path))
    _, _, loss_2 = step.full_train_step(graphdef, moved, rest, state, batch, sgd)
    assert float(loss_2) < float(loss_1)
    assert step.TRACE_COUNTS["full_train_step"] == before + 1  # same shapes, same tx: one trace
