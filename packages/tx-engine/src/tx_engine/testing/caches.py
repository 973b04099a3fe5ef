"""A KV cache full of random keys and values, for tests of decode programs.

An empty cache (zeros, every slot masked) would let a decode step that ignores the cache, reads
the wrong slots or drops the mask pass unnoticed; random contents with a partly masked key mask
make every one of those show in the outputs.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from tx_engine import step as programs
from tx_engine.engine import TrainingEngine
from tx_engine.layers.attention import KVCache

__all__ = ["random_cache"]


def random_cache(engine: TrainingEngine, batch: int, size: int, index: int) -> KVCache:
    """A ``batch × size`` cache of ``engine``'s model (its dtype) with standard-normal
    keys/values, about 70 % of slots unmasked, and write index ``index`` (also the seed)."""
    lora, rest = engine.flat_model_state()
    empty = programs.empty_cache(engine._graphdef, lora, rest, batch=batch, cache_len=size)
    rng = np.random.default_rng(index)
    k, v = (rng.standard_normal(empty.k_lbskh.shape).astype(np.float32) for _ in range(2))
    mask = rng.random((batch, size)) < 0.7
    dt = empty.k_lbskh.dtype
    return KVCache(
        jnp.asarray(k, dt), jnp.asarray(v, dt), jnp.asarray(mask), jnp.asarray(index, jnp.int32)
    )
