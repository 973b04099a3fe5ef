"""The decode-step speed-ups compute exactly what they replace.

* the unrolled threefry Gumbel noise is bit for bit ``jax.random.gumbel`` (so a seed keeps its
  tokens), and the two-reduction argmax is ``jnp.argmax`` (ties, NaN, infinities);
* the decode-specific forward (:mod:`tx_engine.sampling.decode`) equals the model's own cached
  call with ``T = 1`` — logits, written keys/values, mask and index — on every model family,
  with LoRA rows of a trained adapter in the batch, and in bfloat16;
* the graphdef-bound decode program returns what :func:`step.decode_step` returns and compiles
  nothing new for another batch of the same shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tx_engine import step as programs
from tx_engine.config import EngineConfig
from tx_engine.engine import TrainingEngine
from tx_engine.sampling import RowSamplingParams, SamplingRow, decode_keys
from tx_engine.sampling.decode import _generic_logits, decode_logits
from tx_engine.sampling.kernels import _argmax, _gumbel_noise
from tx_engine.sampling.params import KEY_IMPL
from tx_engine.testing.adapters import stepped_adapter
from tx_engine.testing.caches import random_cache


@pytest.mark.parametrize("vocab", [1, 7, 1000, 4099])
def test_gumbel_noise_is_bitwise_jax_random_gumbel(vocab: int) -> None:
    rng = np.random.default_rng(vocab)
    keys = rng.integers(0, 2**32, size=(6, 2), dtype=np.uint64).astype(np.uint32)
    keys[0], keys[1] = [0, 0], [2**32 - 1, 2**32 - 1]
    keys = np.asarray(decode_keys(keys, np.arange(6, dtype=np.uint32)))

    def reference(kd: jax.Array) -> jax.Array:
        wrapped = jax.random.wrap_key_data(kd, impl=KEY_IMPL)
        return jax.vmap(lambda k: jax.random.gumbel(k, (vocab,), jnp.float32))(wrapped)

    want = np.asarray(jax.jit(reference)(keys))
    got = np.asarray(jax.jit(lambda kd: _gumbel_noise(kd, vocab))(keys))
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_argmax_matches_jnp_argmax_on_ties_nan_and_inf() -> None:
    x = np.random.default_rng(1).standard_normal((7, 50)).astype(np.float32)
    x[0, 3] = x[0, 9] = x[0].max() + 1  # tie: first index wins
    x[1, 7] = x[1, 3] = np.nan  # NaN wins, first NaN
    x[2, :] = -np.inf  # all masked
    x[3, 5] = x[3, 9] = np.inf
    x[4, 40] = np.nan
    x[5, 49] = 100.0
    got = np.asarray(jax.jit(_argmax)(x))
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(x, axis=-1)))
    assert got.dtype == np.int32


def _trained_engine(model_dir: Path, dtype: str = "float32") -> TrainingEngine:
    """An engine with one adapter whose ``B`` factors are non-zero (one optimizer step)."""
    eng = TrainingEngine(model_dir, EngineConfig(max_lora_adapters=2, max_lora_rank=8, dtype=dtype))
    stepped_adapter(eng, high=200)
    return eng


def _compare(engine: TrainingEngine, atol: float) -> None:
    model: Any = nnx.merge(engine._graphdef, engine._lora, engine._rest)
    cache = random_cache(engine, batch=4, size=16, index=9)
    args = (
        jnp.asarray([1, 2, 3, 4], jnp.int32),
        jnp.asarray([3, 5, 7, 9], jnp.int32),
        jnp.asarray([0, 1, 0, 1], jnp.int32),  # base and trained-adapter rows
    )
    want_l, want_c = jax.jit(lambda c: _generic_logits(model, *args, c))(cache)
    got_l, got_c = jax.jit(lambda c: decode_logits(model, *args, c))(cache)
    f32 = np.float32
    np.testing.assert_allclose(np.asarray(got_l, f32), np.asarray(want_l, f32), atol=atol)
    for got, want in ((got_c.k_lbskh, want_c.k_lbskh), (got_c.v_lbskh, want_c.v_lbskh)):
        np.testing.assert_allclose(np.asarray(got, f32), np.asarray(want, f32), atol=atol * 10)
    np.testing.assert_array_equal(np.asarray(got_c.mask_bs), np.asarray(want_c.mask_bs))
    assert int(got_c.index) == int(want_c.index) == 10


@pytest.fixture(scope="module")
def qwen3(tiny_qwen3_dir: Path) -> TrainingEngine:
    return _trained_engine(tiny_qwen3_dir)


def test_decode_forward_matches_the_model_call_qwen3(qwen3: TrainingEngine) -> None:
    _compare(qwen3, atol=1e-5)


def test_decode_forward_matches_the_model_call_llama3(tiny_llama3_dir: Path) -> None:
    _compare(_trained_engine(tiny_llama3_dir), atol=1e-5)


def test_decode_forward_matches_the_model_call_moe(tiny_qwen3_moe_dir: Path) -> None:
    _compare(_trained_engine(tiny_qwen3_moe_dir), atol=1e-5)


def test_decode_forward_matches_the_model_call_bf16(tiny_qwen3_dir: Path) -> None:
    # Same rounding points as the model (values cast to bf16 where Attention casts them); the
    # tolerance covers one bf16 ulp of a logit flipping through a different summation order.
    _compare(_trained_engine(tiny_qwen3_dir, "bfloat16"), atol=5e-2)


def test_decode_step_with_the_engines_static_graph_equals_the_bare_graphdef(
    qwen3: TrainingEngine,
) -> None:
    engine = qwen3
    static = engine.graphdef_for_slots({1})  # what the sampler passes: hashed once
    assert isinstance(static, programs.StaticGraph)
    assert engine.graphdef_for_slots({1}) is static  # cached per rank bucket
    rows = SamplingRow.for_request(num_samples=4, seed=3, temperature=0.8, top_k=50)
    params = jax.tree.map(jnp.asarray, RowSamplingParams.stack(rows))
    tokens = jnp.asarray([5, 6, 7, 8], jnp.int32)
    positions = jnp.asarray([9, 9, 9, 9], jnp.int32)
    adapters = jnp.asarray([0, 1, 1, 0], jnp.int32)
    step = jnp.asarray([1, 2, 3, 4], jnp.int32)
    common = (engine._lora, engine._rest, tokens, positions, adapters, params, step)
    want = programs.decode_step(static.graphdef, *common, random_cache(engine, 4, 16, 9))
    got = programs.decode_step(static, *common, random_cache(engine, 4, 16, 9))
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    np.testing.assert_array_equal(np.asarray(got[2].k_lbskh), np.asarray(want[2].k_lbskh))

    topk = programs.decode_step_topk(static, *common, random_cache(engine, 4, 16, 9), k=4)
    want_k = programs.decode_step_topk(
        static.graphdef, *common, random_cache(engine, 4, 16, 9), k=4
    )
    for a, b in zip(topk[3:], want_k[3:], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    before = dict(programs.TRACE_COUNTS)
    other = (engine._lora, engine._rest, tokens + 1, positions + 1, adapters[::-1], params)
    out = programs.decode_step(static, *other, step + 1, random_cache(engine, 4, 16, 10))
    assert out[0].shape == (4,)
    rewrapped = programs.StaticGraph(static.graphdef)  # equal wrapper: the same program
    programs.decode_step(rewrapped, *other, step, random_cache(engine, 4, 16, 10))
    assert dict(programs.TRACE_COUNTS) == before  # new values, same shapes: no new trace
