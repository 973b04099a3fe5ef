"""Per-row sampling parameters as a struct of arrays, so one compiled decode step serves them all.

A decode batch mixes rows from many requests (and many tenants), each with its own temperature,
top-k, top-p and seed. Passing those as *values* in arrays of shape ``[B]`` (not as Python
scalars, which `jax.jit` would bake into the trace) means new values never recompile.

Randomness is a raw threefry key per row (``uint32[B, 2]``) derived on the host from
``(seed, sample_index)`` by a fixed hash, so

* the same seed reproduces the same tokens whatever else is in the batch and at whatever row
  the request lands (nothing depends on the row index or the batch size);
* the samples of one ``num_samples > 1`` request share the seed but differ (distinct
  ``sample_index`` → distinct key);
* the derivation is pure NumPy (no device dispatch per row while building a batch) and does not
  change between JAX versions.

`decode_keys` then folds the decode step (index of the token being generated) into each row's
key inside the jitted step.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

KEY_IMPL = "threefry2x32"  # fixed, so key data is always uint32[2] whatever jax's default
KEY_WORDS = 2
_SEED_BYTES = 16  # seeds are arbitrary ints on the wire; accept anything in signed 128 bits
_TOP_K_OFF = np.iinfo(np.int32).max  # a top_k no vocabulary reaches: filters nothing
# The key stream of a request's prompt_alt_tokens draws: a sample index no real sample reaches,
# so the draws are independent of every sample's tokens yet fixed by the seed.
ALT_DRAWS_SAMPLE_INDEX = 2**64 - 1


def resolve_seed(seed: int | None) -> int:
    """The request's seed, or a fresh random one when the client sent none.

    Resolve once per request (not per sample) so that `num_samples > 1` samples differ only
    through their sample index.
    """
    if seed is None:
        return secrets.randbits(63)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"seed: must be an integer or None, got {seed!r}")
    if not -(2 ** (8 * _SEED_BYTES - 1)) <= int(seed) < 2 ** (8 * _SEED_BYTES - 1):
        raise ValueError(f"seed: must fit in a signed {8 * _SEED_BYTES}-bit integer, got {seed}")
    return int(seed)


def row_key_data(seed: int, sample_index: int) -> np.ndarray:
    """Raw threefry key data (``uint32[2]``) for sample ``sample_index`` of a request with ``seed``.

    A hash (not `jax.random.fold_in`) so that building a batch costs no device dispatch and the
    mapping is stable across JAX releases.
    """
    if sample_index < 0:
        raise ValueError(f"sample_index: must be >= 0, got {sample_index}")
    try:
        seed_bytes = int(seed).to_bytes(_SEED_BYTES, "little", signed=True)
    except OverflowError:
        raise ValueError(f"seed: {seed} does not fit in a signed 128-bit integer") from None
    digest = hashlib.blake2b(
        seed_bytes + int(sample_index).to_bytes(8, "little"), digest_size=4 * KEY_WORDS
    ).digest()
    return np.frombuffer(digest, dtype="<u4").astype(np.uint32)


@dataclass(frozen=True)
class SamplingRow:
    """One row's sampling parameters, validated; the host-side unit a batch is built from.

    ``temperature`` 0 means greedy. ``top_k`` -1 (or 0, as vLLM accepts) means off.
    ``top_p`` in (0, 1], 1 means off.
    """

    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int = 0
    sample_index: int = 0

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature: must be finite and >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or int(self.top_k) != self.top_k or self.top_k < -1:
            raise ValueError(f"top_k: must be an integer >= 1, or -1 for off, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.sample_index < 0:
            raise ValueError(f"sample_index: must be >= 0, got {self.sample_index}")

    @classmethod
    def for_request(
        cls,
        *,
        num_samples: int,
        temperature: float = 1.0,
        top_k: int = -1,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[SamplingRow]:
        """The ``num_samples`` rows of one sample request: one seed, sample indices 0..n-1."""
        if num_samples < 1:
            raise ValueError(f"num_samples: must be >= 1, got {num_samples}")
        resolved = resolve_seed(seed)
        return [cls(temperature, top_k, top_p, resolved, index) for index in range(num_samples)]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class RowSamplingParams:
    """Struct of arrays, one entry per batch row; a JAX pytree (every field is data).

    Fields hold NumPy arrays when built on the host and JAX arrays inside a jitted step.
    """

    temperature: jax.Array | np.ndarray  # float32[B]; 0 = greedy
    top_k: jax.Array | np.ndarray  # int32[B]; <= 0 = off (values >= V are also off)
    top_p: jax.Array | np.ndarray  # float32[B]; >= 1 = off
    key_data: jax.Array | np.ndarray  # uint32[B, 2]; raw threefry key per row

    @classmethod
    def stack(cls, rows: Sequence[SamplingRow], pad_to: int | None = None) -> RowSamplingParams:
        """Arrays for ``rows``, padded with greedy rows up to ``pad_to`` (a batch bucket)."""
        size = len(rows) if pad_to is None else pad_to
        if size < len(rows):
            raise ValueError(f"pad_to: {pad_to} is smaller than the {len(rows)} rows")
        if size == 0:
            raise ValueError("rows: need at least one row")
        temperature = np.zeros(size, np.float32)  # padding rows decode greedily: cheap, harmless
        top_k = np.full(size, -1, np.int32)
        top_p = np.ones(size, np.float32)
        key_data = np.zeros((size, KEY_WORDS), np.uint32)
        for i, row in enumerate(rows):
            temperature[i] = row.temperature
            top_k[i] = min(row.top_k, _TOP_K_OFF)  # any k >= vocab is "off"; int32 must hold it
            top_p[i] = row.top_p
            key_data[i] = row_key_data(row.seed, row.sample_index)
        return cls(temperature, top_k, top_p, key_data)

    @property
    def batch_size(self) -> int:
        return int(self.temperature.shape[0])


def decode_keys(key_data_b2: jax.Array | np.ndarray, step_b: jax.Array | np.ndarray) -> jax.Array:
    """Per-row key data for decode step ``step_b`` (the index of the token being generated).

    Folding in the step (rather than splitting a carried key) keeps a row's randomness a pure
    function of (seed, sample index, step): restarting, re-batching or moving the row to another
    batch slot between steps cannot change its tokens.
    """
    keys_b = jax.random.wrap_key_data(jnp.asarray(key_data_b2, jnp.uint32), impl=KEY_IMPL)
    folded_b = jax.vmap(jax.random.fold_in)(keys_b, jnp.asarray(step_b, jnp.uint32))
    return jax.random.key_data(folded_b)
