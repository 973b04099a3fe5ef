"""Tinker's built-in loss functions as pure JAX kernels over padded batches.

Every kernel has one signature (:data:`LossFn`)::

    loss(target_logprobs, inputs, mask, config) -> elementwise loss [B, T]

* ``target_logprobs`` is ``p``, the learner log-probability of each target token, ``[B, T]``
  (``[B, T, K]`` for ``cross_entropy`` with 2-D targets). It is the only differentiable input.
* ``inputs`` holds the padded ``loss_fn_inputs`` of the wire (``weights``, ``logprobs`` = the
  sampling log-probability ``q``, ``advantages`` = ``A``, ``sequence_ratio_mask``), each
  ``[B, T]`` (``weights`` ``[B, T, K]`` with 2-D targets).
* ``mask`` is 1.0 on real tokens and 0.0 on padding. The loss is exactly 0 on padding (value
  and gradient), whatever the padded inputs hold, so padding never leaks into a sum.
* ``config`` is the request's ``loss_fn_config``; each value is a Python float or an array
  broadcastable to ``[B, T]`` (e.g. ``[B, 1]`` when one batch mixes requests with different
  configs). Missing keys take the defaults of :data:`CONFIG_DEFAULTS`.

The total loss is ``elementwise.sum()``: Tinker sums over tokens and datums with the weights and
advantages as given (signed, any magnitude) and never normalises per sequence or per batch —
a client that wants a mean scales its weights. ``r = exp(p - q)`` throughout; ``sg`` is
``jax.lax.stop_gradient``. All arithmetic is float32 whatever the dtype of ``p``.

``stable_reinforce`` and ``custom`` are wire names (``LossFnType``) this engine does not
implement: :func:`get_loss_fn` raises ``ValueError`` for them and the server reports it as a
``user`` error. :data:`WIRE_LOSS_NAMES` lists all wire names so a test can compare them with
``tx_types``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike

ConfigValue = float | Array
LossFn = Callable[[Array, Mapping[str, Array], Array, Mapping[str, ConfigValue]], Array]

DEFAULT_CLIP_LOW = 0.8
DEFAULT_CLIP_HIGH = 1.2
# Tinker documents DRO's `beta` without a default; 0.05 is a mild quadratic trust region
# (a log-ratio of 1 costs 0.025 per token), chosen so `loss_fn="dro"` without config works.
DEFAULT_DRO_BETA = 0.05

_CLIP_DEFAULTS: dict[str, float] = {
    "clip_low_threshold": DEFAULT_CLIP_LOW,
    "clip_high_threshold": DEFAULT_CLIP_HIGH,
}
_RL_INPUTS = ("target_tokens", "logprobs", "advantages")


def _f32(x: ArrayLike) -> Array:
    return jnp.asarray(x, jnp.float32)


def _masked(loss_bt: Array, mask_bt: Array) -> Array:
    """Zero padding with a select, not a product, so inf/NaN in padded cells cannot leak."""
    return jnp.where(_f32(mask_bt) > 0, loss_bt, jnp.float32(0.0))


def _real(x: Array, mask_bt: Array) -> Array:
    """``x`` in float32 with padded cells replaced by 0 *before* any arithmetic.

    Selecting only the final loss is not enough: the gradient of an unselected ``exp(p - q)``
    is ``0 * inf = NaN`` when padding holds extreme values, so the inputs are cleaned first.
    """
    keep = _f32(mask_bt) > 0
    x = _f32(x)
    return jnp.where(keep[..., None] if x.ndim == keep.ndim + 1 else keep, x, jnp.float32(0.0))


def _param(
    name: str, inputs: Mapping[str, Array], config: Mapping[str, ConfigValue], default: float
) -> Array:
    """A per-token input beats the config entry, which beats the default.

    The SDK coerces `clip_*_threshold` lists in `loss_fn_inputs` to float32, so per-token
    thresholds are accepted as inputs as well as the documented `loss_fn_config` scalars.
    """
    if name in inputs:
        return _f32(inputs[name])
    return _f32(config.get(name, default))


def _pq_a(
    target_logprobs: Array, inputs: Mapping[str, Array], mask: Array
) -> tuple[Array, Array, Array]:
    """Cleaned ``p``, ``q`` and ``A`` of the policy-gradient losses."""
    return (
        _real(target_logprobs, mask),
        _real(inputs["logprobs"], mask),
        _real(inputs["advantages"], mask),
    )


def cross_entropy(
    target_logprobs: Array,
    inputs: Mapping[str, Array],
    mask: Array,
    config: Mapping[str, ConfigValue],
) -> Array:
    """Wire name ``cross_entropy``: ``loss_t = -sum_k p_tk * weights_tk``.

    With 1-D targets K is absent (``-p_t * weights_t``); with ``[N, K]`` targets (soft or
    top-K distillation) the K slots of a token are summed. ``weights`` defaults to 1.0.
    """
    del config
    p = _real(target_logprobs, mask)
    w = _real(inputs["weights"], mask) if "weights" in inputs else jnp.ones_like(p)
    loss = -(p * w)
    if loss.ndim == 3:
        loss = loss.sum(axis=-1)
    return _masked(loss, mask)


def importance_sampling(
    target_logprobs: Array,
    inputs: Mapping[str, Array],
    mask: Array,
    config: Mapping[str, ConfigValue],
) -> Array:
    """Wire name ``importance_sampling``: ``loss_t = -r_t * A_t`` (gradient ``-r_t * A_t``)."""
    del config
    p, q, a = _pq_a(target_logprobs, inputs, mask)
    return _masked(-jnp.exp(p - q) * a, mask)


def ppo(
    target_logprobs: Array,
    inputs: Mapping[str, Array],
    mask: Array,
    config: Mapping[str, ConfigValue],
) -> Array:
    """Wire name ``ppo``: ``loss_t = -min(r_t * A_t, clip(r_t, lo, hi) * A_t)``.

    ``lo``/``hi`` are ``clip_low_threshold`` (0.8) and ``clip_high_threshold`` (1.2), ratios
    (not epsilons), applied token by token.
    """
    p, q, a = _pq_a(target_logprobs, inputs, mask)
    r = jnp.exp(p - q)
    lo = _param("clip_low_threshold", inputs, config, DEFAULT_CLIP_LOW)
    hi = _param("clip_high_threshold", inputs, config, DEFAULT_CLIP_HIGH)
    return _masked(-jnp.minimum(r * a, jnp.clip(r, lo, hi) * a), mask)


def cispo(
    target_logprobs: Array,
    inputs: Mapping[str, Array],
    mask: Array,
    config: Mapping[str, ConfigValue],
) -> Array:
    """Wire name ``cispo``: ``loss_t = -sg(clip(r_t, lo, hi)) * p_t * A_t``.

    The clipped ratio is a constant weight, so the gradient is ``-clip(r_t, lo, hi) * A_t``
    and clipped tokens still learn (unlike PPO). Thresholds as for :func:`ppo`.
    """
    p, q, a = _pq_a(target_logprobs, inputs, mask)
    lo = _param("clip_low_threshold", inputs, config, DEFAULT_CLIP_LOW)
    hi = _param("clip_high_threshold", inputs, config, DEFAULT_CLIP_HIGH)
    weight = jax.lax.stop_gradient(jnp.clip(jnp.exp(p - q), lo, hi))
    return _masked(-weight * p * a, mask)


def dro(
    target_logprobs: Array,
    inputs: Mapping[str, Array],
    mask: Array,
    config: Mapping[str, ConfigValue],
) -> Array:
    """Wire name ``dro``: ``loss_t = -(p_t * A_t - 0.5 * beta * (p_t - q_t)^2)``.

    ``beta`` comes from ``loss_fn_config`` (default :data:`DEFAULT_DRO_BETA` = 0.05). The
    quadratic term is masked too, so padding with arbitrary ``q`` contributes nothing.
    """
    p, q, a = _pq_a(target_logprobs, inputs, mask)
    beta = _param("beta", inputs, config, DEFAULT_DRO_BETA)
    return _masked(-(p * a - 0.5 * beta * jnp.square(p - q)), mask)


def gspo(
    target_logprobs: Array,
    inputs: Mapping[str, Array],
    mask: Array,
    config: Mapping[str, ConfigValue],
) -> Array:
    """Wire name ``gspo`` (GSPO-token): a sequence-level ratio, PPO-clipped, per token.

    With ``M_b = {t : sequence_ratio_mask_bt != 0 and mask_bt > 0}``::

        log_s_b = mean_{t in M_b} (sg(p_bt) - q_bt)        (0 when M_b is empty, s = 1)
        s_bt    = exp(log_s_b + p_bt - sg(p_bt))            value s_b, d s_bt / d p_bt = s_b
        loss_bt = -min(s_bt * A_bt, clip(s_bt, lo, hi) * A_bt)

    So every token carries the sequence ratio's value but only its own log-probability's
    gradient (``-s_b * A_bt`` when unclipped, 0 when the clip binds); the mean itself is not
    differentiated. Thresholds as for :func:`ppo`. Tokens outside ``M_b`` still contribute
    their loss; their advantages (usually 0 on prompts) decide what that is.
    """
    p, q, a = _pq_a(target_logprobs, inputs, mask)
    p_sg = jax.lax.stop_gradient(p)
    in_ratio = (_f32(inputs["sequence_ratio_mask"]) != 0) & (_f32(mask) > 0)
    count = in_ratio.sum(axis=-1, keepdims=True)
    total = jnp.where(in_ratio, p_sg - q, 0.0).sum(axis=-1, keepdims=True)
    log_s = jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)
    s = jnp.exp(log_s + p - p_sg)
    lo = _param("clip_low_threshold", inputs, config, DEFAULT_CLIP_LOW)
    hi = _param("clip_high_threshold", inputs, config, DEFAULT_CLIP_HIGH)
    return _masked(-jnp.minimum(s * a, jnp.clip(s, lo, hi) * a), mask)


LOSS_FNS: dict[str, LossFn] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "dro": dro,
    "gspo": gspo,
}
UNSUPPORTED_LOSS_FNS: frozenset[str] = frozenset({"stable_reinforce", "custom"})
WIRE_LOSS_NAMES: frozenset[str] = frozenset(LOSS_FNS) | UNSUPPORTED_LOSS_FNS

REQUIRED_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens",),
    "importance_sampling": _RL_INPUTS,
    "ppo": _RL_INPUTS,
    "cispo": _RL_INPUTS,
    "dro": _RL_INPUTS,
    "gspo": (*_RL_INPUTS, "sequence_ratio_mask"),
}
CONFIG_DEFAULTS: dict[str, dict[str, float]] = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": dict(_CLIP_DEFAULTS),
    "cispo": dict(_CLIP_DEFAULTS),
    "dro": {"beta": DEFAULT_DRO_BETA},
    "gspo": dict(_CLIP_DEFAULTS),
}


def get_loss_fn(name: str) -> LossFn:
    """The kernel for a wire ``loss_fn`` name; ``ValueError`` naming the valid ones otherwise."""
    if name in LOSS_FNS:
        return LOSS_FNS[name]
    valid = ", ".join(sorted(LOSS_FNS))
    if name in UNSUPPORTED_LOSS_FNS:
        raise ValueError(f"loss_fn {name!r} is not implemented by this server; use one of {valid}")
    raise ValueError(f"unknown loss_fn {name!r}; valid names: {valid}")


def resolve_loss_config(name: str, config: Mapping[str, float] | None) -> dict[str, float]:
    """Validate a request's ``loss_fn_config`` and fill in the defaults.

    Unknown keys, non-numbers, non-finite values, ``clip_low_threshold > clip_high_threshold``
    and negative ``beta`` are rejected with a ``ValueError`` naming the field: silently ignoring
    a misspelt key would train with a different objective than the user asked for.
    """
    get_loss_fn(name)
    defaults = CONFIG_DEFAULTS[name]
    resolved = dict(defaults)
    for key, value in (config or {}).items():
        if key not in defaults:
            accepted = ", ".join(sorted(defaults)) or "none"
            raise ValueError(
                f"loss_fn_config.{key} is not accepted by loss_fn {name!r} (accepted: {accepted})"
            )
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"loss_fn_config.{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"loss_fn_config.{key} must be finite, got {value!r}")
        resolved[key] = float(value)
    lo, hi = resolved.get("clip_low_threshold"), resolved.get("clip_high_threshold")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(
            f"loss_fn_config.clip_low_threshold ({lo}) must not exceed clip_high_threshold ({hi})"
        )
    if resolved.get("beta", 0.0) < 0:
        raise ValueError(f"loss_fn_config.beta must be >= 0, got {resolved['beta']}")
    return resolved


def check_loss_fn_inputs(name: str, input_names: set[str] | frozenset[str]) -> None:
    """Raise ``ValueError`` naming every ``loss_fn_inputs`` field the loss needs but lacks."""
    get_loss_fn(name)
    missing = [k for k in REQUIRED_INPUTS[name] if k not in input_names]
    if missing:
        raise ValueError(f"loss_fn {name!r} requires loss_fn_inputs {', '.join(missing)}")


def target_logprobs_from_logits(
    logits_btv: Array, target_tokens: Array, temperature: float | Array | None = None
) -> Array:
    """``log_softmax(logits / temperature)`` gathered at the targets, in float32.

    ``target_tokens`` is ``[B, T]`` or ``[B, T, K]``; the result has its shape. The gather comes
    before the normalisation (``logit[target] - logsumexp``), so no ``[B, T, V]`` log-softmax
    is materialised, and ``logsumexp`` subtracts the row max, so large logits do not overflow.
    ``temperature`` is a scalar or one value per row ``[B]``.
    """
    logits = _f32(logits_btv)
    if temperature is not None:
        temp = _f32(temperature)
        logits = logits / (temp.reshape(-1, 1, 1) if temp.ndim == 1 else temp)
    lse_bt = jax.nn.logsumexp(logits, axis=-1)
    tokens = jnp.asarray(target_tokens, jnp.int32)
    if tokens.ndim == 2:
        picked = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
        return picked - lse_bt
    return jnp.take_along_axis(logits, tokens, axis=-1) - lse_bt[..., None]


class LossOutputs(NamedTuple):
    """Per-datum outputs of one loss evaluation over a padded batch.

    ``logprobs`` has the shape of the targets (``[B, T]`` or ``[B, T, K]``), 0 on padding;
    ``elementwise_loss`` is ``[B, T]``; ``metrics`` maps ``name:reduction`` keys to per-row
    values ``[B]``. Every metric here reduces by ``sum``, so the worker gets a request's value
    by summing the rows of that request's datums (a batch may mix several requests).
    """

    logprobs: Array
    elementwise_loss: Array
    metrics: dict[str, Array]


def compute_loss(
    loss_fn: LossFn,
    target_logprobs: Array,
    inputs: Mapping[str, Array],
    mask: Array,
    config: Mapping[str, ConfigValue],
) -> tuple[Array, LossOutputs]:
    """Total loss (the scalar to differentiate) and the per-datum outputs, for ``has_aux``.

    Usable as ``jax.value_and_grad(f, has_aux=True)`` body for ``forward_backward`` and
    without the gradient for ``forward``.
    """
    elementwise = loss_fn(target_logprobs, inputs, mask, config)
    mask_f = _f32(mask)
    p = _f32(target_logprobs)
    pad_mask = mask_f if p.ndim == 2 else mask_f[..., None]
    logprobs = jnp.where(pad_mask > 0, jax.lax.stop_gradient(p), 0.0)
    per_row = elementwise.sum(axis=-1)
    outputs = LossOutputs(logprobs, elementwise, {"loss:sum": per_row})
    return per_row.sum(), outputs
