"""Training work at the live slots and rank bucket gives the full-size results.

:func:`tx_engine.step.apply_update` steps only the engine's allocated slots at the stepped
adapters' rank bucket, and :func:`tx_engine.step.forward_backward` with ``rank`` differentiates
only the bucket's rank entries. Both must equal the plain full-size computation — AdamW over
every slot at ``max_lora_rank`` (:func:`tx_engine.optim.apply_update`, itself checked against
torch in ``test_engine_optim.py``) and the gradient over all ranks — and leave everything else
bit-for-bit alone.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tx_engine import batching, optim, step
from tx_engine.config import EngineConfig
from tx_engine.engine import AdamParams, AdapterBatch, DatumArrays, TrainingEngine
from tx_engine.layers import lora as lora_lib
from tx_engine.step.training import is_run

GOLDEN_QWEN3 = Path(__file__).parent / "goldens" / "qwen3"


def sft(slot: int, rows: int, seed: int, length: int = 12) -> AdapterBatch:
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(rows):
        seq = rng.integers(3, 290, length + 1)
        data.append(DatumArrays(seq[:-1].astype(np.int32), {"target_tokens": seq[1:]}))
    return AdapterBatch(slot, data)


def host(tree: Any) -> list[np.ndarray]:
    return [np.array(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def engine() -> TrainingEngine:
    return TrainingEngine(GOLDEN_QWEN3, EngineConfig(max_lora_adapters=5, max_lora_rank=32))


@pytest.mark.parametrize("spread", [False, True], ids=["window", "spread"])
def test_optim_steps_match_full_size_adamw_and_leave_the_rest_alone(
    engine: TrainingEngine, spread: bool
) -> None:
    # Slots 1, 2, 3 step as one window of live slots (one slice per leaf); 1, 3, 5 with a
    # padding slot, one slice per slot.
    ranks = (4, 1, 16, 1, 8) if spread else (4, 16, 8, 1, 1)
    made = [engine.create_adapter(rank=r, seed=i + 1) for i, r in enumerate(ranks)]
    a, b, c = made[0::2] if spread else made[:3]
    for s in made:
        if s not in (a, b, c):
            engine.free_adapter(s)
    assert is_run(engine._live_slots()) is not spread
    for i, s in enumerate((a, b, c)):  # two steps: moments and counts are non-trivial
        engine.forward_backward([sft(s, 2, seed=i)])
    engine.optim_steps({s: AdamParams(1e-2) for s in (a, b, c)})
    engine.forward_backward([sft(a, 2, 5), sft(b, 1, 6), sft(c, 3, 7)])

    lora, grads = host(engine._lora), host(engine._grads)
    m, v, count = host(engine._opt.m), host(engine._opt.v), np.array(engine._opt.count)
    params = {a: AdamParams(2e-2, weight_decay=0.1, grad_clip_norm=0.5), c: AdamParams(1e-3)}
    hyper = optim.AdamHyper.defaults(engine.num_slots)
    mask = np.zeros(engine.num_slots, bool)
    for s, p in params.items():
        hyper = hyper.with_slot(s, **asdict(p))
        mask[s] = True
    treedef = jax.tree.structure(engine._lora)

    def tree(leaves: list[np.ndarray]) -> Any:
        return jax.tree.unflatten(treedef, [jnp.asarray(x) for x in leaves])

    ref_p, ref_opt, ref_metrics = optim.apply_update(
        tree(lora), tree(grads), optim.OptState(tree(m), tree(v), jnp.asarray(count)), hyper, mask
    )
    out = engine.optim_steps(params)

    new_grads = host(engine._grads)
    pairs = [
        (host(engine._lora), host(ref_p)),
        (host(engine._opt.m), host(ref_opt.m)),
        (host(engine._opt.v), host(ref_opt.v)),
    ]
    for got_tree, ref_tree in pairs:
        for got, ref in zip(got_tree, ref_tree, strict=True):
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-8)  # clip-norm order
            for s in range(engine.num_slots):
                if s not in params:  # untouched, bit for bit
                    np.testing.assert_array_equal(got[s], ref[s])
    np.testing.assert_array_equal(np.array(engine._opt.count), np.array(ref_opt.count))
    for before, after in zip(grads, new_grads, strict=True):
        for s in range(engine.num_slots):
            expected = np.zeros_like(before[s]) if s in params else before[s]
            np.testing.assert_array_equal(after[s], expected)
    assert max(float(np.abs(g[b]).max()) for g in new_grads) > 0  # b's gradients still wait
    for s in params:
        for name in ("grad_norm", "update_norm", "param_norm", "learning_rate"):
            ref = float(np.asarray(getattr(ref_metrics, name))[s])
            assert out[s][name] == pytest.approx(ref, rel=1e-5), name
        assert out[s]["step"] == float(ref_opt.count[s])
    for s in (a, b, c):
        engine.free_adapter(s)


def test_rank_cut_gradient_equals_the_full_rank_gradient(engine: TrainingEngine) -> None:
    a = engine.create_adapter(rank=8, seed=11)
    b = engine.create_adapter(rank=3, seed=12)
    engine.forward_backward([sft(a, 2, 1), sft(b, 2, 2)])
    engine.optim_steps({a: AdamParams(1e-2), b: AdamParams(1e-2)})  # B ≠ 0
    rows = batching.validate([sft(a, 2, 3), sft(b, 1, 4)], engine.vocab_size, {a: a, b: b})
    (mb_rows,) = batching.plan(rows, engine.config)
    batch = jax.tree.map(jnp.asarray, dict(batching.pack(mb_rows, engine.config, 0).arrays))
    graphdef = engine.graphdef_for_slots([a, b])
    start = jax.tree.map(lambda x: jnp.full(x.shape, 0.25, x.dtype), engine._lora)
    args = (graphdef, engine._lora, engine._rest)
    out_full, full = step.forward_backward(*args, start, batch, "cross_entropy", 0)
    start = jax.tree.map(lambda x: jnp.full(x.shape, 0.25, x.dtype), engine._lora)
    out_cut, cut = step.forward_backward(*args, start, batch, "cross_entropy", 0, rank=8)
    np.testing.assert_allclose(out_cut.elementwise_loss, out_full.elementwise_loss, atol=1e-6)
    flat_cut = jax.tree_util.tree_flatten_with_path(cut)[0]
    for (path, g_cut), g_full in zip(flat_cut, jax.tree.leaves(full), strict=True):
        g_cut, g_full = np.asarray(g_cut), np.asarray(g_full)
        np.testing.assert_allclose(g_cut, g_full, rtol=1e-5, atol=1e-6)
        axis = g_cut.ndim + (-1 if "lora_a" in jax.tree_util.keystr(path) else -2)
        above = np.take(g_cut, np.arange(8, g_cut.shape[axis]), axis=axis)
        np.testing.assert_array_equal(above, 0.25)  # the accumulator above the rank: untouched
    assert max(float(np.abs(np.asarray(g) - 0.25).max()) for g in jax.tree.leaves(cut)) > 0
    for s in (a, b):
        engine.free_adapter(s)


def test_optimizer_programs_depend_on_live_count_and_rank_bucket_only(
    engine: TrainingEngine,
) -> None:
    a = engine.create_adapter(rank=8, seed=21)
    b = engine.create_adapter(rank=5, seed=22)
    engine.forward_backward([sft(a, 1, 1), sft(b, 1, 2)])
    engine.optim_step(a)
    traces = step.TRACE_COUNTS["apply_update"]
    engine.optim_step(b)
    engine.optim_steps({a: AdamParams(), b: AdamParams(3e-4)})
    assert step.TRACE_COUNTS["apply_update"] == traces
    high = engine.create_adapter(rank=32, seed=23)  # 3 live slots → 4, new program
    engine.optim_step(high)  # rank bucket 32
    assert step.TRACE_COUNTS["apply_update"] == traces + 1
    for s in (a, b, high):
        engine.free_adapter(s)


def test_live_slots_are_padded_to_a_power_of_two_with_free_slots(
    engine: TrainingEngine,
) -> None:
    slots = [engine.create_adapter(rank=1, seed=i) for i in range(3)]
    live = engine._live_slots().tolist()
    assert live[:3] == slots
    assert len(set(live)) == len(live) == 4
    assert live[3] not in slots
    assert live == list(range(live[0], live[0] + 4))  # one window: cut with one slice
    extra = engine.create_adapter(rank=1, seed=9)
    assert sorted(engine._live_slots().tolist()) == sorted([*slots, extra])
    engine.free_adapter(slots[1])
    engine.free_adapter(slots[2])  # left: slots 1 and 4, too far apart for a window of 2
    assert engine._live_slots().tolist() == [slots[0], extra]
    for s in (slots[0], extra):
        engine.free_adapter(s)
    assert engine.num_slots == 6


def test_take_and_put_slots_touch_only_the_chosen_slots_and_ranks() -> None:
    tree = {
        "q": {"lora_a": jnp.arange(3 * 4 * 5.0).reshape(3, 4, 5)},
        "o": {"lora_b": jnp.arange(3 * 5 * 2.0).reshape(3, 5, 2)},
    }
    slots = jnp.asarray([2, 0])
    sub = lora_lib.take_slots(tree, slots, 3)
    np.testing.assert_array_equal(
        sub["q"]["lora_a"], np.asarray(tree["q"]["lora_a"])[[2, 0], :, :3]
    )
    np.testing.assert_array_equal(sub["o"]["lora_b"], np.asarray(tree["o"]["lora_b"])[[2, 0], :3])
    ones = jax.tree.map(jnp.ones_like, sub)
    added = lora_lib.put_slots(tree, ones, slots, 3, add=True)
    want = np.asarray(tree["q"]["lora_a"]).copy()
    want[[2, 0], :, :3] += 1
    np.testing.assert_array_equal(added["q"]["lora_a"], want)
    run = jnp.asarray([1, 2])  # consecutive: one slice per leaf, the same values
    for add in (False, True):
        window = lora_lib.take_slots(tree, run, 3, contiguous=True)
        jax.tree.map(np.testing.assert_array_equal, window, lora_lib.take_slots(tree, run, 3))
        jax.tree.map(
            np.testing.assert_array_equal,
            lora_lib.put_slots(tree, ones, run, 3, add=add, contiguous=True),
            lora_lib.put_slots(tree, ones, run, 3, add=add),
        )
    whole = lora_lib.put_slots(tree, lora_lib.take_slots(tree, None, 5), None, 5)
    np.testing.assert_array_equal(whole["o"]["lora_b"], tree["o"]["lora_b"])
    with pytest.raises(Exception, match="not a LoRA factor"):
        lora_lib.take_slots({"w": jnp.zeros((2, 2))}, None, 1)
