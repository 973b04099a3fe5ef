"""Model state that crosses the jit boundary flat (:mod:`tx_engine.step.flat_state`).

A sampling run passes ``lora`` / ``rest`` flat instead of jit re-flattening the nnx states at
every decode dispatch; the training programs take and return states flat around the compiled
call, and the engine keeps its trees flat between calls. All of it must compute exactly what
the states compute, and new but equal :class:`FlatState` objects must reuse the compiled
program.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tx_engine import step as programs
from tx_engine.config import EngineConfig
from tx_engine.engine import AdamParams, AdapterBatch, DatumArrays, TrainingEngine
from tx_engine.layers.attention import KVCache
from tx_engine.sampling import RowSamplingParams, SamplingRow
from tx_engine.step.flat_state import FlatState, Held, state_of, unflatten_states


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


def test_flat_programs_take_and_give_states_or_flat_ones(engine: TrainingEngine) -> None:
    """A training program called with states returns states; ``.flat`` returns the same
    values flat (also inside tuples and ``OptState``) from the same compiled program."""
    trees = (engine._lora, engine._opt)
    slot = jnp.int32(1)
    as_states = programs.take_slot(trees, slot)
    before = dict(programs.TRACE_COUNTS)
    flat = programs.take_slot.flat((FlatState.of(engine._lora), engine._opt), slot)
    assert dict(programs.TRACE_COUNTS) == before  # states and flat states share the program
    lora, opt = as_states
    assert isinstance(lora, nnx.State)
    assert isinstance(opt.m, nnx.State)
    assert isinstance(flat[0], FlatState)
    assert isinstance(flat[1].m, FlatState)
    assert jax.tree.structure(lora) == jax.tree.structure(engine._lora)
    for got, want in zip(jax.tree.leaves(flat), jax.tree.leaves(as_states), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert jax.tree.structure(unflatten_states(flat)) == jax.tree.structure(as_states)


def test_held_builds_each_side_once_from_the_other(engine: TrainingEngine) -> None:
    held = Held(engine._opt)
    assert held.tree is engine._opt
    assert held.flat is held.flat  # flattened once, then kept
    assert isinstance(held.flat.m, FlatState)
    assert held.flat.count is engine._opt.count
    back = Held(flat=held.flat)
    assert back.tree is back.tree  # rebuilt once, then kept
    assert jax.tree.structure(back.tree) == jax.tree.structure(engine._opt)
    for a, b in zip(jax.tree.leaves(back.tree), jax.tree.leaves(engine._opt), strict=True):
        assert a is b  # the same arrays, never copies


def test_training_calls_keep_the_engine_state_flat(tiny_qwen3_dir: Path) -> None:
    """forward, forward_backward and optim_step read and replace only the flat side of the
    engine's trees (what saves their per-dispatch state work); the states are rebuilt on demand and
    hold exactly those arrays."""
    engine = TrainingEngine(tiny_qwen3_dir, EngineConfig(max_lora_adapters=2, max_lora_rank=8))
    slot = engine.create_adapter(rank=8, seed=0)
    tokens = np.arange(5, 21)
    batch = [AdapterBatch(slot, [DatumArrays(tokens, {"target_tokens": tokens + 1})])]
    rest = engine._held_rest.flat
    engine.forward_backward(batch)
    engine.optim_step(slot, AdamParams(learning_rate=1e-2))
    engine.forward(batch)
    assert engine._held_rest.flat is rest  # flattened once, not per call
    for name in ("lora", "grads", "opt"):  # replaced by the calls: no state was built
        assert getattr(engine, f"_held_{name}")._tree is None, name
    assert engine.flat_model_state()[0] is engine._held_lora.flat
    lora = engine._lora
    assert isinstance(lora, nnx.State)
    for a, b in zip(jax.tree.leaves(lora), engine._held_lora.flat.leaves, strict=True):
        assert a is b
    assert engine.step_count(slot) == 1
