"""RMSNorm exactly as Hugging Face Llama/Qwen3: normalise in float32, cast back, then scale."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tx_engine.layers.common import make_param


class RMSNorm(nnx.Module):
    """``y = weight * (x / sqrt(mean(x²) + eps))``; the weight multiply happens after the cast
    back to the activation dtype, matching HF rounding in bfloat16."""

    def __init__(
        self, dim: int, *, eps: float, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs
    ) -> None:
        self.eps = eps
        self.dtype = dtype
        self.weight = make_param(
            rngs, nnx.initializers.ones, (dim,), param_dtype, ("norm",), "identity"
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
        return self.weight[...].astype(self.dtype) * normed
