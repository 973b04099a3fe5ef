"""The decode forward skips LoRA for base-model batches without changing a bit.

:func:`tx_engine.sampling.decode.decode_logits` puts every projection's LoRA term behind a
``lax.cond`` on "some row has an adapter". Skipping is only allowed because a base row's term is
exactly ``+0.0``: these tests check that a base row's logits and cache writes are bitwise the
same whether its batch takes the skip (all rows base) or not (one adapter row beside it), that
the adapter row really gets its adapter, and that the skipped path still equals the model's own
cached call.
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
from tx_engine.sampling import RowSamplingParams, SamplingRow
from tx_engine.sampling.decode import _generic_logits, decode_logits
from tx_engine.testing.adapters import stepped_adapter
from tx_engine.testing.caches import random_cache


def _trained_engine(model_dir: Path) -> TrainingEngine:
    """An engine whose adapter slot 1 has non-zero ``B`` factors (one optimizer step)."""
    eng = TrainingEngine(model_dir, EngineConfig(max_lora_adapters=2, max_lora_rank=8))
    stepped_adapter(eng, high=200)
    return eng


@pytest.fixture(scope="module")
def trained() -> dict[str, TrainingEngine]:
    """Trained engines per preset fixture name, built once for the module."""
    return {}


def _engine(trained: dict[str, TrainingEngine], preset: str, request: Any) -> TrainingEngine:
    if preset not in trained:
        trained[preset] = _trained_engine(request.getfixturevalue(preset))
    return trained[preset]


def _run(engine: TrainingEngine, adapters: list[int], generic: bool = False) -> Any:
    model: Any = nnx.merge(engine._graphdef, engine._lora, engine._rest)
    tokens = jnp.asarray([1, 2, 3, 4], jnp.int32)
    positions = jnp.asarray([3, 5, 7, 9], jnp.int32)
    fn = _generic_logits if generic else decode_logits
    out = jax.jit(lambda a, c: fn(model, tokens, positions, a, c))(
        jnp.asarray(adapters, jnp.int32), random_cache(engine, 4, 16, 9)
    )
    return jax.device_get(out)


@pytest.mark.parametrize("preset", ["tiny_qwen3_dir", "tiny_llama3_dir"])
def test_base_rows_are_bitwise_equal_with_and_without_the_lora_switch(
    preset: str, request: pytest.FixtureRequest, trained: dict[str, TrainingEngine]
) -> None:
    engine = _engine(trained, preset, request)
    base_l, base_c = _run(engine, [0, 0, 0, 0])  # no adapter row: LoRA skipped
    mixed_l, mixed_c = _run(engine, [0, 0, 0, 1])  # LoRA computed for every row
    np.testing.assert_array_equal(base_l[:3].view(np.uint32), mixed_l[:3].view(np.uint32))
    for a, b in ((base_c.k_lbskh, mixed_c.k_lbskh), (base_c.v_lbskh, mixed_c.v_lbskh)):
        np.testing.assert_array_equal(a[:, :3], b[:, :3])
    # The adapter row really is adapted (the switch is not stuck off) ...
    assert np.abs(mixed_l[3] - base_l[3]).max() > 1e-4
    # ... and the skipped path is still the model's own cached call.
    want_l, want_c = _run(engine, [0, 0, 0, 0], generic=True)
    np.testing.assert_allclose(base_l, want_l, atol=1e-5)
    np.testing.assert_allclose(base_c.k_lbskh, want_c.k_lbskh, atol=1e-4)
    np.testing.assert_array_equal(base_c.mask_bs, want_c.mask_bs)


def test_the_switch_is_a_value_not_a_new_program(
    request: pytest.FixtureRequest, trained: dict[str, TrainingEngine]
) -> None:
    engine = _engine(trained, "tiny_qwen3_dir", request)
    graph = engine.graphdef_for_slots({1})
    rows = SamplingRow.for_request(num_samples=4, seed=3)
    params = jax.tree.map(jnp.asarray, RowSamplingParams.stack(rows))
    common = (jnp.asarray([5, 6, 7, 8], jnp.int32), jnp.full((4,), 9, jnp.int32))
    step = jnp.asarray(1, jnp.int32)
    lora, rest = engine._lora, engine._rest
    programs.decode_step(graph, lora, rest, *common, jnp.zeros(4, jnp.int32), params, step, random_cache(engine, 4, 16, 9))  # fmt: skip
    before = dict(programs.TRACE_COUNTS)
    mixed = jnp.asarray([0, 1, 0, 1], jnp.int32)
    programs.decode_step(
        graph, lora, rest, *common, mixed, params, step, random_cache(engine, 4, 16, 9)
    )
    assert dict(programs.TRACE_COUNTS) == before
