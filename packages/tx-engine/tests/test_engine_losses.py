"""Tinker loss kernels against plain-NumPy oracles: values and gradients w.r.t. ``p``.

The oracles below are written from the formulas of the wire spec (§6.4) and Tinker's loss
docs, independently of ``tx_engine.losses``; gradients are the analytic derivatives, which for
cispo and gspo include the stop-gradients (a finite difference would *not* match them).
"""

from __future__ import annotations

import functools
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tx_engine import losses

B, T = 3, 16
LENGTHS = (16, 11, 5)
RTOL, ATOL = 2e-5, 1e-5


# ---------------------------------------------------------------- NumPy oracles (value, d/dp)


def np_cross_entropy(p, inp, cfg):
    w = inp.get("weights", np.ones_like(p))
    val, grad = -p * w, -w
    return (val.sum(-1) if p.ndim == 3 else val), grad


def np_importance_sampling(p, inp, cfg):
    r, a = np.exp(p - inp["logprobs"]), inp["advantages"]
    return -r * a, -r * a


def np_ppo(p, inp, cfg):
    lo, hi = cfg.get("clip_low_threshold", 0.8), cfg.get("clip_high_threshold", 1.2)
    r, a = np.exp(p - inp["logprobs"]), inp["advantages"]
    unclipped, clipped = r * a, np.clip(r, lo, hi) * a
    # The unclipped branch carries d(r*A)/dp = r*A; the clipped one has zero slope outside
    # [lo, hi] and equals the unclipped one inside, so the slope is r*A unless the clip binds.
    uses_unclipped = (unclipped <= clipped) | ((r > lo) & (r < hi))
    return -np.minimum(unclipped, clipped), np.where(uses_unclipped, -r * a, 0.0)


def np_cispo(p, inp, cfg):
    lo, hi = cfg.get("clip_low_threshold", 0.8), cfg.get("clip_high_threshold", 1.2)
    c, a = np.clip(np.exp(p - inp["logprobs"]), lo, hi), inp["advantages"]
    return -c * p * a, -c * a


def np_dro(p, inp, cfg):
    beta, q, a = cfg.get("beta", 0.05), inp["logprobs"], inp["advantages"]
    return -(p * a - 0.5 * beta * (p - q) ** 2), -(a - beta * (p - q))


def np_gspo(p, inp, cfg, mask):
    lo, hi = cfg.get("clip_low_threshold", 0.8), cfg.get("clip_high_threshold", 1.2)
    a, val, grad = inp["advantages"], np.zeros_like(p), np.zeros_like(p)
    for b in range(p.shape[0]):
        sel = (inp["sequence_ratio_mask"][b] != 0) & (mask[b] > 0)
        s = np.exp(np.mean(p[b, sel] - inp["logprobs"][b, sel])) if sel.any() else 1.0
        unclipped, clipped = s * a[b], np.clip(s, lo, hi) * a[b]
        val[b] = -np.minimum(unclipped, clipped)
        binds = (clipped < unclipped) & ~((s > lo) & (s < hi))
        grad[b] = np.where(binds, 0.0, -s * a[b])
    return val, grad


def oracle(name, p, inp, cfg, mask):
    p = p.astype(np.float64)
    inp = {k: v.astype(np.float64) for k, v in inp.items()}
    if name == "gspo":
        val, grad = np_gspo(p, inp, cfg, mask)
    else:
        val, grad = globals()[f"np_{name}"](p, inp, cfg)
    m = mask if grad.ndim == 2 else mask[..., None]
    return val * mask, grad * m


# ---------------------------------------------------------------- data


def make_batch(seed: int = 0):
    """A padded batch whose ratios straddle both clip bounds with both advantage signs."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(T)[None, :] < np.array(LENGTHS)[:, None]).astype(np.float32)
    p = rng.uniform(-4.0, -0.05, (B, T)).astype(np.float32)
    q = (p - rng.uniform(-0.6, 0.6, (B, T))).astype(np.float32)
    adv = rng.uniform(-30.0, 30.0, (B, T)).astype(np.float32)
    weights = rng.uniform(-5.0, 1000.0, (B, T)).astype(np.float32)
    srm = (rng.uniform(size=(B, T)) > 0.3).astype(np.float32)
    srm[:, 0] = 0.0  # a "prompt" position outside the sequence ratio
    # Garbage in padding: extreme values must not leak into values or gradients.
    pad = mask == 0
    q[pad], adv[pad], weights[pad], p[pad], srm[pad] = -1e30, 1e30, 1e30, 1e30, 1.0
    inputs = {"logprobs": q, "advantages": adv, "weights": weights, "sequence_ratio_mask": srm}
    return p, inputs, mask


@functools.cache
def _jitted(name):
    fn = losses.get_loss_fn(name)

    def total(p, inputs, mask, cfg):
        return fn(p, inputs, mask, cfg).sum()

    return jax.jit(fn), jax.jit(jax.grad(total))


def run_kernel(name, p, inputs, mask, cfg):
    """Value and d(total)/dp, jitted once per loss and shape (eager dispatch is slow)."""
    value_fn, grad_fn = _jitted(name)
    args = (jnp.asarray(p), {k: jnp.asarray(v) for k, v in inputs.items()}, jnp.asarray(mask), cfg)
    return np.asarray(value_fn(*args)), np.asarray(grad_fn(*args))


def clean(p, inputs, mask):
    """The oracle sees zeros where the kernel sees garbage; only real tokens are compared."""
    keep = mask > 0
    return np.where(keep, p, 0.0), {k: np.where(keep, v, 0.0) for k, v in inputs.items()}


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("name", sorted(losses.LOSS_FNS))
def test_value_and_gradient_match_numpy_oracle(name: str) -> None:
    p, inputs, mask = make_batch()
    val, grad = run_kernel(name, p, inputs, mask, {})
    want_val, want_grad = oracle(name, *clean(p, inputs, mask), {}, mask)
    np.testing.assert_allclose(val, want_val, rtol=RTOL, atol=ATOL * np.abs(want_val).max())
    np.testing.assert_allclose(grad, want_grad, rtol=RTOL, atol=ATOL * np.abs(want_grad).max())
    assert np.isfinite(grad).all()
    assert (val[mask == 0] == 0).all()
    assert (grad[mask == 0] == 0).all()


def test_batch_exercises_both_clip_regions_with_both_signs() -> None:
    """Guard on the data above: the ppo/cispo tests would be vacuous without it."""
    p, inputs, mask = make_batch()
    keep = mask > 0
    r, a = np.exp(p[keep] - inputs["logprobs"][keep]), inputs["advantages"][keep]
    for region in (r < 0.8, r > 1.2, (r > 0.8) & (r < 1.2)):
        assert (region & (a > 0)).any()
        assert (region & (a < 0)).any()


def test_padding_is_inert_and_rows_are_independent() -> None:
    """Each row alone gives that row's loss and gradient: no coupling, no normalisation.

    The batch has extreme garbage in its padding; the single rows are padded with zeros.
    """
    p, inputs, mask = make_batch()
    pc, ic = clean(p, inputs, mask)
    for name in losses.LOSS_FNS:
        batch_val, batch_grad = run_kernel(name, p, inputs, mask, {})
        for b in range(B):
            row = slice(b, b + 1)
            row_inputs = {k: v[row] for k, v in ic.items()}
            row_val, row_grad = run_kernel(name, pc[row], row_inputs, mask[row], {})
            np.testing.assert_array_equal(batch_val[b], row_val[0])
            np.testing.assert_array_equal(batch_grad[b], row_grad[0])


def test_cross_entropy_with_nk_targets_sums_the_k_slots() -> None:
    rng = np.random.default_rng(1)
    _, _, mask = make_batch()
    p = rng.uniform(-6, 0, (B, T, 4)).astype(np.float32)
    w = rng.uniform(-2, 3, (B, T, 4)).astype(np.float32)
    w[mask == 0] = 7e30
    val, grad = run_kernel("cross_entropy", p, {"weights": w}, mask, {})
    keep = (mask > 0)[..., None]
    want_val, want_grad = oracle(
        "cross_entropy", np.where(keep, p, 0), {"weights": np.where(keep, w, 0)}, {}, mask
    )
    assert val.shape == (B, T)
    assert grad.shape == (B, T, 4)
    np.testing.assert_allclose(val, want_val, rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=RTOL, atol=1e-6)


def test_cross_entropy_weights_default_to_one() -> None:
    p, _, mask = make_batch()
    val, grad = run_kernel("cross_entropy", p, {}, mask, {})
    np.testing.assert_allclose(val, np.where(mask > 0, -p, 0), rtol=1e-6)
    np.testing.assert_array_equal(grad, -mask)


@pytest.mark.parametrize("name", ["ppo", "cispo", "gspo"])
def test_clip_config_overrides_scalar_per_row_and_per_token(name: str) -> None:
    p, inputs, mask = make_batch(2)
    cfg = {"clip_low_threshold": 0.95, "clip_high_threshold": 1.03}
    val, grad = run_kernel(name, p, inputs, mask, cfg)
    want_val, want_grad = oracle(name, *clean(p, inputs, mask), cfg, mask)
    np.testing.assert_allclose(val, want_val, rtol=RTOL, atol=1e-4)
    np.testing.assert_allclose(grad, want_grad, rtol=RTOL, atol=1e-4)
    default_val, _ = run_kernel(name, p, inputs, mask, {})
    assert not np.allclose(val, default_val)  # the override changed something
    # The same thresholds as per-row arrays and as per-token inputs give the same result.
    per_row = {k: jnp.full((B, 1), v) for k, v in cfg.items()}
    np.testing.assert_array_equal(run_kernel(name, p, inputs, mask, per_row)[0], val)
    per_token = {**inputs, **{k: np.full((B, T), v, np.float32) for k, v in cfg.items()}}
    np.testing.assert_array_equal(run_kernel(name, p, per_token, mask, {})[0], val)


def test_dro_beta_override_and_quadratic_term_masked() -> None:
    p, inputs, mask = make_batch(3)
    val, grad = run_kernel("dro", p, inputs, mask, {"beta": 0.7})
    want_val, want_grad = oracle("dro", *clean(p, inputs, mask), {"beta": 0.7}, mask)
    np.testing.assert_allclose(val, want_val, rtol=RTOL, atol=1e-4)
    np.testing.assert_allclose(grad, want_grad, rtol=RTOL, atol=1e-4)
    assert (val[mask == 0] == 0).all()  # q = -1e30 on padding would make (p-q)^2 = inf


def test_cispo_gradient_is_minus_clipped_ratio_times_advantage() -> None:
    p, inputs, mask = make_batch()
    _, grad = run_kernel("cispo", p, inputs, mask, {})
    p, inputs = clean(p, inputs, mask)
    r = np.exp(p.astype(np.float64) - inputs["logprobs"])
    want = np.where(mask > 0, -np.clip(r, 0.8, 1.2) * inputs["advantages"], 0.0)
    np.testing.assert_allclose(grad, want, rtol=RTOL, atol=1e-4)
    # Not the gradient of the un-stopped expression -clip(r)*p*A, which has an extra term.
    inside = (mask > 0) & (r > 0.8) & (r < 1.2)
    naive = -(np.clip(r, 0.8, 1.2) + r * p) * inputs["advantages"]
    assert not np.allclose(grad[inside], naive[inside])


def test_gspo_sequence_ratio_uses_only_marked_tokens_and_empty_rows_give_one() -> None:
    p, inputs, mask = make_batch(4)
    inputs["sequence_ratio_mask"][2] = 0.0  # row 2: no marked token, s = 1
    inputs["advantages"][mask > 0] = 1.0
    val, grad = run_kernel(
        "gspo", p, inputs, mask, {"clip_low_threshold": 0.0, "clip_high_threshold": 1e9}
    )
    pc, ic = clean(p, inputs, mask)
    for b in range(B):
        sel = (ic["sequence_ratio_mask"][b] != 0) & (mask[b] > 0)
        s = np.exp(np.mean(pc[b, sel] - ic["logprobs"][b, sel])) if sel.any() else 1.0
        np.testing.assert_allclose(val[b][mask[b] > 0], -s, rtol=1e-5)
        # Each token's gradient is -s*A_t: its own logprob only, the mean is stop-gradded.
        np.testing.assert_allclose(grad[b][mask[b] > 0], -s, rtol=1e-5)


def test_gspo_clip_binds_per_sequence() -> None:
    p, inputs, mask = make_batch(5)
    inputs["logprobs"] = inputs["logprobs"].copy()
    inputs["logprobs"][0, :] = p[0] - 0.5  # s = e^0.5 > 1.2: positive advantages are clipped
    inputs["advantages"][0, : LENGTHS[0]] = np.linspace(-1, 1, LENGTHS[0])
    _, grad = run_kernel("gspo", p, inputs, mask, {})
    a = inputs["advantages"][0]
    np.testing.assert_array_equal(grad[0][a > 0], 0.0)
    np.testing.assert_allclose(grad[0][a < 0], -np.exp(0.5) * a[a < 0], rtol=1e-5)


def test_registry_matches_the_sdk_wire_names() -> None:
    tinker_types = pytest.importorskip("tinker.types")
    wire = set(typing.get_args(tinker_types.LossFnType))
    assert wire == losses.WIRE_LOSS_NAMES
    assert set(losses.LOSS_FNS) == wire - {"stable_reinforce", "custom"}
    assert set(losses.REQUIRED_INPUTS) == set(losses.CONFIG_DEFAULTS) == set(losses.LOSS_FNS)


def test_unknown_and_unimplemented_names_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown loss_fn 'mse'.*cispo, cross_entropy"):
        losses.get_loss_fn("mse")
    for name in ("stable_reinforce", "custom"):
        with pytest.raises(ValueError, match=f"{name}' is not implemented"):
            losses.get_loss_fn(name)


def test_resolve_loss_config_defaults_and_validation() -> None:
    assert losses.resolve_loss_config("ppo", None) == {
        "clip_low_threshold": 0.8,
        "clip_high_threshold": 1.2,
    }
    assert losses.resolve_loss_config("dro", {"beta": 2}) == {"beta": 2.0}
    assert losses.resolve_loss_config("dro", {}) == {"beta": losses.DEFAULT_DRO_BETA}
    assert losses.resolve_loss_config("cross_entropy", {}) == {}
    bad = [
        ("cross_entropy", {"beta": 1.0}, r"loss_fn_config\.beta is not accepted.*none"),
        ("ppo", {"clip_low": 0.5}, r"loss_fn_config\.clip_low is not accepted"),
        ("ppo", {"clip_low_threshold": float("nan")}, "must be finite"),
        ("ppo", {"clip_high_threshold": "1.3"}, "must be a number"),
        ("gspo", {"clip_low_threshold": 1.5}, "must not exceed"),
        ("dro", {"beta": -1.0}, r"beta must be >= 0"),
        ("custom", {}, "not implemented"),
    ]
    for name, cfg, msg in bad:
        with pytest.raises(ValueError, match=msg):
            losses.resolve_loss_config(name, cfg)


def test_check_loss_fn_inputs_names_missing_fields() -> None:
    losses.check_loss_fn_inputs("cross_entropy", {"target_tokens"})
    with pytest.raises(ValueError, match="requires loss_fn_inputs advantages, sequence_ratio_mask"):
        losses.check_loss_fn_inputs("gspo", {"target_tokens", "logprobs"})


def np_log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.mark.parametrize("temperature", [None, 0.7, "per_row"])
def test_target_logprobs_from_logits(temperature) -> None:
    rng = np.random.default_rng(6)
    logits = (rng.normal(size=(B, T, 11)) * 5 + 3e4).astype(np.float32)  # large: needs max-shift
    temp = np.array([0.5, 1.0, 2.0], np.float32) if temperature == "per_row" else temperature
    scaled = logits / (1.0 if temp is None else np.reshape(temp, (-1, 1, 1)))
    # Reference from logits relative to the row max (the 3e4 offset cancels exactly).
    ref = np_log_softmax(scaled.astype(np.float64))
    tokens = rng.integers(0, 11, (B, T))
    got = losses.target_logprobs_from_logits(jnp.asarray(logits), jnp.asarray(tokens), temp)
    want = np.take_along_axis(ref, tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-2 if temp is not None else 5e-3)
    tokens_k = rng.integers(0, 11, (B, T, 3))
    got_k = losses.target_logprobs_from_logits(jnp.asarray(logits), jnp.asarray(tokens_k), temp)
    assert got_k.shape == (B, T, 3)
    np.testing.assert_allclose(
        np.asarray(got_k),
        np.take_along_axis(ref, tokens_k, -1),
        atol=2e-2 if temp is not None else 5e-3,
    )


def test_cross_entropy_gradient_through_logits_is_softmax_minus_onehot() -> None:
    rng = np.random.default_rng(7)
    _, _, mask = make_batch()
    logits = rng.normal(size=(B, T, 13)).astype(np.float32)
    tokens = rng.integers(0, 13, (B, T))
    w = rng.uniform(-1, 2, (B, T)).astype(np.float32)

    def total(lg):
        p = losses.target_logprobs_from_logits(lg, jnp.asarray(tokens))
        return losses.compute_loss(losses.cross_entropy, p, {"weights": w}, mask, {})[0]

    grad = np.asarray(jax.jit(jax.grad(total))(jnp.asarray(logits)))
    softmax = np.exp(np_log_softmax(logits))
    onehot = np.eye(13)[tokens]
    want = -(w * mask)[..., None] * (onehot - softmax)
    np.testing.assert_allclose(grad, want, atol=1e-6)


def test_compute_loss_outputs_and_metrics() -> None:
    p, inputs, mask = make_batch()
    (total, out), grad = jax.value_and_grad(losses.compute_loss, argnums=1, has_aux=True)(
        losses.ppo, jnp.asarray(p), inputs, jnp.asarray(mask), {}
    )
    want_val, want_grad = oracle("ppo", *clean(p, inputs, mask), {}, mask)
    assert set(out.metrics) == {"loss:sum"}
    np.testing.assert_allclose(out.metrics["loss:sum"], want_val.sum(-1), rtol=1e-5)
    np.testing.assert_allclose(total, want_val.sum(), rtol=1e-5)
    np.testing.assert_allclose(out.elementwise_loss, want_val, rtol=RTOL, atol=1e-4)
    np.testing.assert_allclose(grad, want_grad, rtol=RTOL, atol=1e-4)
    np.testing.assert_array_equal(out.logprobs, np.where(mask > 0, p, 0))
    assert out.logprobs.dtype == jnp.float32
    assert out.elementwise_loss.shape == (B, T)
    # [B, T, K] targets: logprobs keep the target shape, padding zeroed.
    pk = np.repeat(p[..., None], 2, -1)
    _, out_k = losses.compute_loss(losses.cross_entropy, pk, {}, mask, {})
    assert out_k.logprobs.shape == (B, T, 2)
    assert out_k.elementwise_loss.shape == (B, T)
    np.testing.assert_array_equal(out_k.logprobs[mask == 0], 0.0)


def test_kernels_accept_bfloat16_logprobs_and_compute_in_float32() -> None:
    p, inputs, mask = make_batch()
    val = losses.importance_sampling(jnp.asarray(p, jnp.bfloat16), inputs, mask, {})
    assert val.dtype == jnp.float32
    ref = np.asarray(
        losses.importance_sampling(
            jnp.asarray(p, jnp.bfloat16).astype(jnp.float32), inputs, mask, {}
        )
    )
    np.testing.assert_array_equal(np.asarray(val), ref)
