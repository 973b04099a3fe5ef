"""Per-adapter AdamW against a NumPy transcription of torch.optim.AdamW + clip_grad_norm_.

The oracle follows torch's single-tensor AdamW (float64, one adapter at a time, with its own
step count); ``clip_grad_norm_`` scales by ``min(1, max_norm / (total_norm + 1e-6))``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tx_engine import optim

A = 3
SHAPES = {"layer0": {"lora_a": (4, 2), "lora_b": (2, 5)}, "layer1": {"lora_a": (3, 2)}}
HYPER = {  # slot 0: decay; slot 1: clipping active on tiny grads; slot 2: clip inactive
    "learning_rate": [1e-2, 3e-3, 1e-3],
    "beta1": [0.9, 0.8, 0.95],
    "beta2": [0.95, 0.999, 0.9],
    "eps": [1e-12, 1e-8, 1e-6],
    "weight_decay": [0.1, 0.0, 0.01],
    "grad_clip_norm": [0.0, 1e-4, 1e3],
}
GRAD_SCALE = np.array([1.0, 1e-3, 0.5])


def paths():
    return [(k, n) for k, leaves in SHAPES.items() for n in leaves]


def make_tree(rng, scale=None):
    tree = {}
    for k, n in paths():
        x = rng.normal(size=(A, *SHAPES[k][n]))
        if scale is not None:
            x = x * scale.reshape(-1, 1, 1)
        tree.setdefault(k, {})[n] = x.astype(np.float32)
    return tree


STEP = jax.jit(optim.apply_update)  # eager dispatch of every op would dominate the runtime


def hyper():
    return optim.AdamHyper(**{k: np.asarray(v, np.float32) for k, v in HYPER.items()})


class TorchAdamW:
    """torch.optim.AdamW (amsgrad=False) for one adapter's leaves, in float64."""

    def __init__(self, params, slot):
        self.p = [np.float64(params[k][n][slot]) for k, n in paths()]
        self.m = [np.zeros_like(x) for x in self.p]
        self.v = [np.zeros_like(x) for x in self.p]
        self.step_t = 0
        # The engine holds hyperparameters as float32; the oracle uses those exact values.
        self.h = {k: float(np.float32(v[slot])) for k, v in HYPER.items()}

    def step(self, grads, slot):
        h = self.h
        g = [np.float64(grads[k][n][slot]) for k, n in paths()]
        norm = np.sqrt(sum((x**2).sum() for x in g))
        if h["grad_clip_norm"] > 0:  # torch.nn.utils.clip_grad_norm_
            g = [x * min(h["grad_clip_norm"] / (norm + 1e-6), 1.0) for x in g]
        self.step_t += 1
        old = [x.copy() for x in self.p]
        for i in range(len(self.p)):
            self.p[i] = self.p[i] * (1 - h["learning_rate"] * h["weight_decay"])
            self.m[i] = self.m[i] + (g[i] - self.m[i]) * (1 - h["beta1"])  # lerp_
            self.v[i] = self.v[i] * h["beta2"] + (1 - h["beta2"]) * g[i] * g[i]
            bc1 = 1 - h["beta1"] ** self.step_t
            bc2_sqrt = (1 - h["beta2"] ** self.step_t) ** 0.5
            denom = np.sqrt(self.v[i]) / bc2_sqrt + h["eps"]
            self.p[i] = self.p[i] - (h["learning_rate"] / bc1) * self.m[i] / denom
        upd = np.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(self.p, old, strict=True)))
        pn = np.sqrt(sum((x**2).sum() for x in self.p))
        return norm, upd, pn


def leaf(tree, k, n):
    return np.asarray(tree[k][n])


def test_matches_torch_adamw_over_steps_with_masks_decay_and_clipping() -> None:
    rng = np.random.default_rng(0)
    params = make_tree(rng)
    oracles = [TorchAdamW(params, s) for s in range(A)]
    state = optim.init_state(params)
    step = STEP
    masks = [[1, 1, 1], [1, 0, 1], [1, 1, 0], [0, 1, 1], [1, 1, 1], [1, 1, 1]]
    for mask in masks:
        grads = make_tree(rng, GRAD_SCALE)
        params, state, metrics = step(params, grads, state, hyper(), np.array(mask, bool))
        for s in range(A):
            if mask[s]:
                norm, upd, pn = oracles[s].step(grads, s)
                np.testing.assert_allclose(metrics.grad_norm[s], norm, rtol=1e-5)
                np.testing.assert_allclose(metrics.update_norm[s], upd, rtol=1e-4)
                np.testing.assert_allclose(metrics.param_norm[s], pn, rtol=1e-5)
        for s in range(A):
            o = oracles[s]
            for i, (k, n) in enumerate(paths()):
                np.testing.assert_allclose(leaf(params, k, n)[s], o.p[i], rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(leaf(state.m, k, n)[s], o.m[i], rtol=1e-5, atol=1e-12)
                np.testing.assert_allclose(leaf(state.v, k, n)[s], o.v[i], rtol=1e-5, atol=1e-14)
        np.testing.assert_array_equal(state.count, [o.step_t for o in oracles])
    np.testing.assert_array_equal(metrics.learning_rate, np.float32(HYPER["learning_rate"]))


def test_clipping_uses_torch_denominator_guard() -> None:
    """With a gradient norm of ~1e-3 the 1e-6 guard changes the moments by ~1e-3 relative."""
    rng = np.random.default_rng(1)
    params, grads = make_tree(rng), make_tree(rng, GRAD_SCALE)
    _, state, metrics = STEP(params, grads, optim.init_state(params), hyper(), np.ones(A, bool))
    norm = float(metrics.grad_norm[1])
    assert norm > HYPER["grad_clip_norm"][1]  # clipping is active for slot 1
    clip = np.float32(HYPER["grad_clip_norm"][1])
    beta1 = np.float32(HYPER["beta1"][1])
    g = leaf(grads, "layer0", "lora_a")[1]
    torch_m = (1 - beta1) * g * (clip / (norm + 1e-6))
    no_guard_m = (1 - beta1) * g * (clip / norm)
    got = leaf(state.m, "layer0", "lora_a")[1]
    np.testing.assert_allclose(got, torch_m, rtol=1e-5)
    assert not np.allclose(got, no_guard_m, rtol=1e-4, atol=0)
    # Slot 2's clip (1e3) is far above its norm: its moments see the raw gradient.
    np.testing.assert_allclose(
        leaf(state.m, "layer0", "lora_a")[2],
        (1 - np.float32(HYPER["beta1"][2])) * leaf(grads, "layer0", "lora_a")[2],
        rtol=1e-6,
    )


def assert_only_slot_stepped(before, after, stepped: int) -> None:
    """Every tree of ``after`` (params, moments) equals ``before`` bit for bit in all slots but
    ``stepped``, whose values changed and are finite."""
    for tree_old, tree_new in zip(before, after, strict=True):
        for k, n in paths():
            old, new = leaf(tree_old, k, n), leaf(tree_new, k, n)
            others = np.arange(old.shape[0]) != stepped
            np.testing.assert_array_equal(new[others], old[others])  # bit-for-bit
            assert np.isfinite(new[stepped]).all()
            assert not np.array_equal(new[stepped], old[stepped])


def test_unstepped_slot_is_bit_exact_even_with_nonfinite_grads() -> None:
    rng = np.random.default_rng(2)
    params = make_tree(rng)
    params, state, _ = STEP(
        params, make_tree(rng), optim.init_state(params), hyper(), np.ones(A, bool)
    )
    grads = make_tree(rng)
    for k, n in paths():
        grads[k][n][1] = np.nan
        grads[k][n][2] = np.inf
    new_params, new_state, metrics = STEP(
        params, grads, state, hyper(), np.array([True, False, False])
    )
    assert_only_slot_stepped((params, state.m, state.v), (new_params, new_state.m, new_state.v), 0)
    np.testing.assert_array_equal(new_state.count, [2, 1, 1])
    assert np.isfinite(metrics.grad_norm[0])
    assert np.asarray(metrics.update_norm)[1:].tolist() == [
        0,
        0,
    ]


def test_a_nonfinite_step_is_skipped_for_its_slot_only() -> None:
    """A stepped slot whose gradient is NaN/inf (slots 0, 1), or whose update overflows at a
    huge learning rate (slot 2, finite gradient), keeps params, moments and count, and says
    so in ``skipped``; an applied NaN would poison the adapter for good. The other slot of
    the same call (3) steps as usual."""
    rng = np.random.default_rng(4)
    four = optim.AdamHyper(*(np.append(h, h[:1]) for h in hyper()))
    params = jax.tree.map(lambda x: np.concatenate([x, x[:1]]), make_tree(rng))
    params, state, _ = STEP(
        params, make_tree_like(rng, params), optim.init_state(params), four, np.ones(4, bool)
    )
    grads = make_tree_like(rng, params)
    for k, n in paths():
        grads[k][n][0, 0] = np.nan
        grads[k][n][1, 0] = np.inf
    lr = np.array(four.learning_rate)
    lr[2] = 3e38  # finite, and a float32, but the update is not
    four = four._replace(learning_rate=lr)
    new_params, new_state, metrics = STEP(params, grads, state, four, np.ones(4, bool))
    np.testing.assert_array_equal(metrics.skipped, [1.0, 1.0, 1.0, 0.0])
    np.testing.assert_array_equal(new_state.count, [1, 1, 1, 2])
    assert_only_slot_stepped((params, state.m, state.v), (new_params, new_state.m, new_state.v), 3)


def make_tree_like(rng, params):
    return jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)


def test_each_slot_steps_exactly_as_if_it_were_alone() -> None:
    """Another tenant's weight decay, clipping and gradients never reach a slot."""
    rng = np.random.default_rng(3)
    params, grads = make_tree(rng), make_tree(rng, GRAD_SCALE)
    h = hyper()
    all_p, all_s, _ = STEP(params, grads, optim.init_state(params), h, np.ones(A, bool))
    for s in range(A):

        def one(tree, s=s):
            return jax.tree.map(lambda leaf_: leaf_[s : s + 1], tree)

        h1 = optim.AdamHyper(*(x[s : s + 1] for x in h))
        p1, s1, _ = STEP(
            one(params), one(grads), optim.init_state(one(params)), h1, np.ones(1, bool)
        )
        for k, n in paths():
            # Same math, different program shape: allow reduction-order ULPs, nothing more
            # (another slot's decay or clipping would show up at >= 1e-4 relative).
            np.testing.assert_allclose(leaf(all_p, k, n)[s], leaf(p1, k, n)[0], rtol=1e-6, atol=0)
            np.testing.assert_allclose(
                leaf(all_s.m, k, n)[s], leaf(s1.m, k, n)[0], rtol=1e-6, atol=0
            )


def test_new_hyperparameters_and_masks_do_not_recompile() -> None:
    traces = []

    def counted(*args):
        traces.append(1)
        return optim.apply_update(*args)

    step = jax.jit(counted)
    rng = np.random.default_rng(4)
    params = make_tree(rng)
    state = optim.init_state(params)
    h = optim.AdamHyper.defaults(A)
    for i, mask in enumerate([[1, 1, 1], [0, 1, 0], [1, 0, 1]]):
        h = h.with_slot(i, learning_rate=10.0 ** -(i + 2), weight_decay=0.1 * i, grad_clip_norm=i)
        params, state, _ = step(params, make_tree(rng), state, h, np.array(mask, bool))
    assert len(traces) == 1


def test_slot_state_round_trip_and_mismatch_errors() -> None:
    rng = np.random.default_rng(6)
    params = make_tree(rng)
    _, state, _ = STEP(
        params, make_tree(rng), optim.init_state(params), hyper(), np.array([1, 1, 0], bool)
    )
    arrays = optim.slot_state_to_arrays(state, 0)
    assert set(arrays) == {f"{t}/{k}/{n}" for t in "mv" for k, n in paths()} | {"count"}
    assert all(isinstance(x, np.ndarray) for x in arrays.values())
    restored = optim.slot_state_from_arrays(optim.init_state(params), 2, arrays)
    np.testing.assert_array_equal(restored.count, [0, 0, 1])
    for k, n in paths():
        np.testing.assert_array_equal(leaf(restored.m, k, n)[2], leaf(state.m, k, n)[0])
        np.testing.assert_array_equal(leaf(restored.v, k, n)[2], leaf(state.v, k, n)[0])
        assert (leaf(restored.m, k, n)[:2] == 0).all()
    bad = {**{k: v for k, v in arrays.items() if k != "count"}, "m/extra": np.zeros(1)}
    with pytest.raises(ValueError, match=r"missing \['count'\], unexpected \['m/extra'\]"):
        optim.slot_state_from_arrays(state, 0, bad)
    with pytest.raises(ValueError, match=r"'m/layer0/lora_a': shape \(4, 3\)"):
        optim.slot_state_from_arrays(state, 0, {**arrays, "m/layer0/lora_a": np.zeros((4, 3))})


class LoRAParam(nnx.Param):
    """Stand-in for the engine's LoRA variable type: the optimizer only sees a pytree."""


class TinyLoRA(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.lora_a = LoRAParam(jax.random.normal(rngs.params(), (A, 4, 2)))
        self.lora_b = LoRAParam(jax.random.normal(rngs.params(), (A, 2, 3)).astype(jnp.bfloat16))


def test_works_on_nnx_state_and_keeps_param_dtype() -> None:
    _, params, _ = nnx.split(TinyLoRA(nnx.Rngs(0)), LoRAParam, ...)
    grads = jax.tree.map(jnp.ones_like, params)
    new, state, _ = STEP(params, grads, optim.init_state(params), hyper(), np.ones(A, bool))
    assert new["lora_b"][...].dtype == jnp.bfloat16
    assert state.m["lora_b"][...].dtype == jnp.float32
    # First Adam step with g = 1: p' = p * (1 - lr*wd) - lr * 1/(1 + eps*sqrt(1-b2)).
    lr, wd = np.float32(HYPER["learning_rate"]), np.float32(HYPER["weight_decay"])
    old = np.asarray(params["lora_a"][...])
    want = old * (1 - lr * wd).reshape(-1, 1, 1) - lr.reshape(-1, 1, 1)
    np.testing.assert_allclose(np.asarray(new["lora_a"][...]), want, rtol=1e-5, atol=1e-6)
    assert "m/lora_a/value" in optim.slot_state_to_arrays(state, 0)


def test_hyper_helpers_and_input_validation() -> None:
    h = optim.AdamHyper.defaults(2)
    np.testing.assert_array_equal(h.beta2, np.float32([0.95, 0.95]))
    np.testing.assert_array_equal(h.eps, np.float32([1e-12, 1e-12]))
    h2 = h.with_slot(1, learning_rate=0.5)
    np.testing.assert_array_equal(h2.learning_rate, np.float32([1e-4, 0.5]))
    np.testing.assert_array_equal(h.learning_rate, np.float32([1e-4, 1e-4]))  # copy
    with pytest.raises(ValueError, match=r"unknown AdamW hyperparameter.*lr"):
        h.with_slot(0, lr=1.0)
    with pytest.raises(ValueError, match="leading adapter axis"):
        optim.init_state({"a": np.zeros((2, 3)), "b": np.zeros((3, 3))})
