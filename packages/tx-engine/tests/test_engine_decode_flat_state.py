"""Pre-flattened model state (:class:`FlatState`) for the sampling programs.

A run flattens ``lora`` / ``rest`` once instead of jit re-flattening the nnx states at every
decode dispatch. It must compute exactly what the states compute, and a later run's (new but
equal) :class:`FlatState` must reuse the compiled program.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tx_engine import step as programs
from tx_engine.config import EngineConfig
from tx_engine.engine import TrainingEngine
from tx_engine.layers.attention import KVCache
from tx_engine.sampling import RowSamplingParams, SamplingRow
from tx_engine.sampling.flat_state import FlatState, state_of


@pytest.fixture(scope="module")
def engine(tiny_qwen3_dir: Path) -> TrainingEngine:
    return TrainingEngine(tiny_qwen3_dir, EngineConfig(max_lora_adapters=2, max_lora_rank=8))


def test_flat_state_round_trips_to_the_same_state(engine: TrainingEngine) -> None:
    flat = FlatState.of(engine._lora)
    back = state_of(flat)
    assert jax.tree.structure(back) == jax.tree.structure(engine._lora)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(engine._lora), strict=True):
        assert a is b  # the state's own arrays, not copies
    assert state_of(engine._lora) is engine._lora
    assert FlatState.of(engine._rest).spec is FlatState.of(engine._rest).spec  # interned


def test_decode_step_on_flat_state_is_bitwise_the_state_one_and_compiles_once(
    engine: TrainingEngine,
) -> None:
    graph = engine.graphdef_for_slots({0})
    rows = SamplingRow.for_request(num_samples=4, seed=5, temperature=0.9, top_p=0.8)
    params = jax.tree.map(jnp.asarray, RowSamplingParams.stack(rows))
    args = (
        jnp.asarray([5, 6, 7, 8], jnp.int32),
        jnp.asarray([3, 4, 5, 6], jnp.int32),
        jnp.zeros(4, jnp.int32),
        params,
        jnp.asarray([1, 2, 3, 4], jnp.int32),
    )

    def cache() -> KVCache:
        c = programs.empty_cache(graph, engine._lora, engine._rest, batch=4, cache_len=16)
        mask = c.mask_bs.at[:, :6].set(True)
        k = jnp.asarray(np.random.default_rng(0).standard_normal(c.k_lbskh.shape), c.k_lbskh.dtype)
        return KVCache(k, k * 0.5, mask, jnp.asarray(6, jnp.int32))

    want = programs.decode_step(graph, engine._lora, engine._rest, *args, cache())
    flat = (FlatState.of(engine._lora), FlatState.of(engine._rest))
    got = programs.decode_step(graph, *flat, *args, cache())
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1]).view(np.uint32), np.asarray(want[1]).view(np.uint32))  # fmt: skip
    np.testing.assert_array_equal(np.asarray(got[2].k_lbskh), np.asarray(want[2].k_lbskh))

    before = dict(programs.TRACE_COUNTS)
    again = (FlatState.of(engine._lora), FlatState.of(engine._rest))  # a new run's objects
    programs.decode_step(graph, *again, *args, cache())
    assert dict(programs.TRACE_COUNTS) == before
