"""Parameter construction shared by every layer.

Every base parameter is an ``nnx.Param`` carrying two pieces of metadata:

* ``logical_axes`` — logical axis names, mapped to mesh axes by :mod:`tx_engine.sharding`;
* ``hf_layout``    — how the tensor is stored in a Hugging Face checkpoint, declared by the
  layer that owns the parameter (never guessed from its name):

  - ``"identity"``: same shape as HF (norm scales, embeddings, biases);
  - ``"linear"``: HF ``nn.Linear.weight`` is ``[out, in]``; we store ``[in, out]`` so that
    ``y = x @ W`` — the loader transposes;
  - ``"experts"``: HF stores one ``[out, in]`` Linear per expert under
    ``<prefix>.experts.{j}.<name>.weight``; we store the stack ``[E, in, out]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

HFLayout = Literal["identity", "linear", "experts"]
Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


def make_param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: tuple[int, ...],
    param_dtype: jnp.dtype,
    axes: tuple[str | None, ...],
    layout: HFLayout,
) -> nnx.Param[jax.Array]:
    """A base ``nnx.Param`` with its sharding axes and checkpoint layout declared."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {shape}")
    value = init(rngs.params(), shape, param_dtype)
    return nnx.Param(value, logical_axes=axes, hf_layout=layout)


def default_kernel_init() -> Initializer:
    """Init used only when a model is built without a checkpoint (tests, from scratch)."""
    return nnx.initializers.normal(stddev=0.02)
