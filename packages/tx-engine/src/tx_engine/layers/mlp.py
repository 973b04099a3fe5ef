"""SwiGLU MLP of Llama/Qwen3: ``down(silu(gate(x)) * up(x))``, every projection with LoRA."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tx_engine.layers.linear import LoRALinear, LoRASpec


class MLP(nnx.Module):
    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        lora: LoRASpec,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
        use_bias: bool = False,
    ) -> None:
        kw: dict[str, Any] = {
            "lora": lora,
            "dtype": dtype,
            "param_dtype": param_dtype,
            "rngs": rngs,
        }
        self.gate_proj = LoRALinear(
            dim, hidden, axes=("embed", "mlp"), group="mlp", use_bias=use_bias, **kw
        )
        self.up_proj = LoRALinear(
            dim, hidden, axes=("embed", "mlp"), group="mlp", use_bias=use_bias, **kw
        )
        self.down_proj = LoRALinear(
            hidden, dim, axes=("mlp", "embed"), group="mlp", use_bias=use_bias, **kw
        )

    def __call__(
        self, x_btd: jax.Array, adapter_indices_b: jax.Array, *, lora_on: jax.Array | None = None
    ) -> jax.Array:
        """``lora_on`` goes to every projection (see :meth:`LoRALinear.__call__`)."""
        gate_btf = self.gate_proj(x_btd, adapter_indices_b, lora_on=lora_on)
        up_btf = self.up_proj(x_btd, adapter_indices_b, lora_on=lora_on)
        return self.down_proj(jax.nn.silu(gate_btf) * up_btf, adapter_indices_b, lora_on=lora_on)
