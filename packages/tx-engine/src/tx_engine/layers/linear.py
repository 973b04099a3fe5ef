"""Linear projection with multi-tenant LoRA, and the token embedding.

``LoRALinear`` stores its weight ``[D_in, D_out]`` (HF ``[out, in]`` is transposed on load, see
``layers/common.py``) and owns a :class:`~tx_engine.layers.lora.LoRAFactors` child named ``lora``.
A tied ``lm_head`` is a ``LoRALinear`` with ``has_weight=False``: it owns LoRA factors only and
receives the embedding matrix at call time.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from tx_engine.layers.common import default_kernel_init, make_param
from tx_engine.layers.lora import LoRAFactors, LoRAGroup


@dataclass(frozen=True)
class LoRASpec:
    """Static LoRA capacity: ``num_slots`` (incl. base slot 0) and ``max_rank``."""

    num_slots: int
    max_rank: int

    def __post_init__(self) -> None:
        if self.num_slots < 1 or self.max_rank < 1:
            raise ValueError(f"LoRA num_slots/max_rank must be >= 1, got {self}")


class LoRALinear(nnx.Module):
    """``y = x·W (+ b) + scaling[s]·(x·A[s])·B[s]`` per row."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        axes: tuple[str | None, str | None],
        group: LoRAGroup,
        lora: LoRASpec,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
        use_bias: bool = False,
        has_weight: bool = True,
    ) -> None:
        self.dtype = dtype
        self.weight = (
            make_param(rngs, default_kernel_init(), (d_in, d_out), param_dtype, axes, "linear")
            if has_weight
            else None
        )
        self.bias = (
            make_param(rngs, nnx.initializers.zeros, (d_out,), param_dtype, (axes[1],), "identity")
            if use_bias
            else None
        )
        self.lora = LoRAFactors(
            (),
            d_in,
            d_out,
            max_adapters=lora.num_slots,
            max_rank=lora.max_rank,
            group=group,
            axes=((), axes[0], axes[1]),
        )

    def __call__(
        self,
        x_btd: jax.Array,
        adapter_indices_b: jax.Array,
        *,
        weight_df: jax.Array | None = None,
        lora_on: jax.Array | None = None,
    ) -> jax.Array:
        """``weight_df`` overrides the own weight (tied lm_head passes ``embed.T``).

        ``lora_on`` (a device boolean, "some row has an adapter") puts the LoRA term behind a
        ``lax.cond`` so base-only decode batches skip it: no recompile, since it is a value, and
        no bit changes, since base slot 0 has zero factors and its term is exactly ``+0.0``.
        ``None`` adds the term unconditionally (training and prefill: no ``cond`` in the program).
        """
        if weight_df is None:
            if self.weight is None:
                raise ValueError("LoRALinear without its own weight needs weight_df")
            weight_df = self.weight[...]
        x_btd = x_btd.astype(self.dtype)
        y_btf = jnp.einsum(
            "btd,df->btf", x_btd, weight_df.astype(self.dtype), preferred_element_type=jnp.float32
        ).astype(self.dtype)
        if self.bias is not None:
            y_btf = y_btf + self.bias[...].astype(self.dtype)
        if not self.lora.active_rank:  # a batch without adapter rows (rank bucket 0)
            return y_btf
        if lora_on is None:
            return y_btf + self.lora.delta(x_btd, adapter_indices_b)
        out: jax.Array = jax.lax.cond(
            lora_on, lambda: y_btf + self.lora.delta(x_btd, adapter_indices_b), lambda: y_btf
        )
        return out


class Embed(nnx.Module):
    """Token embedding ``[V, D]`` (HF layout, no transpose); ``attend`` gives tied logits."""

    def __init__(
        self, vocab: int, dim: int, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs
    ) -> None:
        self.dtype = dtype
        self.weight = make_param(
            rngs, default_kernel_init(), (vocab, dim), param_dtype, ("vocab", "embed"), "identity"
        )

    def __call__(self, ids_bt: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids_bt, axis=0).astype(self.dtype)
