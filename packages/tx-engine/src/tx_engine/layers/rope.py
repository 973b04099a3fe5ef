"""Rotary position embeddings (HF "rotate_half" convention) with Llama 3 frequency scaling.

The inverse frequencies are computed in float64 and rounded to float32 once; angles are then
``position * inv_freq`` in float32 exactly as transformers does, which keeps positions beyond
2k within float32 parity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tx_engine.errors import ConfigError


def rope_inv_freq(head_dim: int, theta: float, scaling: Mapping[str, Any] | None) -> np.ndarray:
    """Inverse frequencies ``[H/2]`` for rope type ``default`` or ``llama3``."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    inv_freq = inv_freq.astype(np.float32)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type != "llama3":
        raise ConfigError(
            f"rope_scaling.rope_type={rope_type!r} is not supported (default, llama3)"
        )
    assert scaling is not None
    try:
        factor = float(scaling["factor"])
        low = float(scaling["low_freq_factor"])
        high = float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
    except KeyError as e:
        raise ConfigError(f"rope_scaling (llama3) is missing field {e.args[0]!r}") from e
    return _llama3_scale(inv_freq, factor, low, high, old_len)


def _llama3_scale(
    inv_freq: np.ndarray, factor: float, low: float, high: float, old_len: float
) -> np.ndarray:
    """transformers' ``_compute_llama3_parameters``, op for op, in float32."""
    f32 = np.float32
    low_wavelen, high_wavelen = f32(old_len / low), f32(old_len / high)
    wavelen = (f32(2 * math.pi) / inv_freq).astype(f32)
    scaled = np.where(wavelen > low_wavelen, inv_freq / f32(factor), inv_freq).astype(f32)
    smooth = ((f32(old_len) / wavelen - f32(low)) / f32(high - low)).astype(f32)
    smoothed = ((1 - smooth) * scaled / f32(factor) + smooth * scaled).astype(f32)
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(f32)


def rope_cos_sin(positions_bt: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """``cos, sin`` of shape ``[B, T, H]`` (frequencies repeated twice, HF layout), float32."""
    freqs_bth = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb_bth = jnp.concatenate([freqs_bth, freqs_bth], axis=-1)
    return jnp.cos(emb_bth), jnp.sin(emb_bth)


def apply_rope(x_btnh: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array) -> jax.Array:
    """``x·cos + rotate_half(x)·sin`` with ``rotate_half(x) = [-x2, x1]``."""
    half = x_btnh.shape[-1] // 2
    rotated = jnp.concatenate([-x_btnh[..., half:], x_btnh[..., :half]], axis=-1)
    cos = cos_bth[:, :, None, :].astype(x_btnh.dtype)
    sin = sin_bth[:, :, None, :].astype(x_btnh.dtype)
    return x_btnh * cos + rotated * sin
