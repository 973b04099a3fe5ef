"""TrainingEngine on tiny-qwen3: learning, summed losses, accumulation, tenant isolation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from tx_engine.checkpoint import LoraConfig
from tx_engine.config import EngineConfig
from tx_engine.engine import (
    AdamParams,
    AdapterBatch,
    DatumArrays,
    InputError,
    NoFreeSlotError,
    TrainingEngine,
)
from tx_engine.errors import AdapterError, TxEngineError
from tx_engine.layers import lora as lora_lib

# One batch bucket and data of ≤ 16 tokens: every test reuses the same two compiled programs.
CONFIG = EngineConfig(
    max_lora_adapters=4, max_lora_rank=8, batch_buckets=(8,), logits_chunk_tokens=32
)


def sft_datum(seq: np.ndarray, weights: np.ndarray | None = None) -> DatumArrays:
    """Next-token datum for ``seq``: inputs ``seq[:-1]``, targets ``seq[1:]``."""
    inputs = {"target_tokens": seq[1:].astype(np.int64)}
    if weights is not None:
        inputs["weights"] = weights.astype(np.float32)
    return DatumArrays(seq[:-1].astype(np.int32), inputs)


def random_data(n: int, seed: int, lo: int = 6, hi: int = 15) -> list[DatumArrays]:
    rng = np.random.default_rng(seed)
    return [sft_datum(rng.integers(5, 2000, rng.integers(lo, hi))) for _ in range(n)]


def slot_leaves(tree: object, slot: int) -> list[np.ndarray]:
    return [np.asarray(x[slot]) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def engine(tiny_qwen3_dir: Path) -> TrainingEngine:
    return TrainingEngine(tiny_qwen3_dir, CONFIG)


@pytest.fixture
def fresh(engine: TrainingEngine) -> Iterator[TrainingEngine]:
    """The shared engine, with every slot a test allocated freed afterwards."""
    yield engine
    for slot in list(engine.adapters):
        engine.free_adapter(slot)


def test_sft_loss_falls_on_a_memorisable_sequence(fresh: TrainingEngine) -> None:
    slot = fresh.create_adapter(rank=8, seed=1)
    data = [sft_datum(np.arange(100, 113))]
    losses = []
    for _ in range(20):
        out = fresh.forward_backward([AdapterBatch(slot, data)])
        losses.append(out[0].metrics["loss:sum"])
        metrics = fresh.optim_step(slot, AdamParams(learning_rate=3e-3))
    assert losses[-1] < 0.2 * losses[0], losses
    assert metrics["step"] == 20.0
    assert metrics["grad_norm"] > 0


def test_summed_weighted_loss_matches_forward_logprobs(fresh: TrainingEngine) -> None:
    slot = fresh.create_adapter(rank=4, seed=2)
    rng = np.random.default_rng(0)
    data = [
        sft_datum(seq, rng.normal(size=len(seq) - 1))  # signed, unnormalised weights
        for seq in (rng.integers(5, 2000, n) for n in (9, 14, 5))
    ]
    fwd = fresh.forward([AdapterBatch(slot, data)])[0]
    fb = fresh.forward_backward([AdapterBatch(slot, data)])[0]
    expected = 0.0
    for datum, out_f, out_b in zip(data, fwd.outputs, fb.outputs, strict=True):
        weights = datum.loss_fn_inputs["weights"]
        assert out_f.logprobs.shape == datum.loss_fn_inputs["target_tokens"].shape
        np.testing.assert_allclose(out_b.logprobs, out_f.logprobs, rtol=1e-6)
        np.testing.assert_allclose(out_f.elementwise_loss, -weights * out_f.logprobs, rtol=1e-6)
        assert np.all(out_f.logprobs < 0)
        expected += float(-(weights * out_f.logprobs).sum())
    assert fwd.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)
    assert fb.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)


def test_two_half_calls_accumulate_to_one_whole_call(fresh: TrainingEngine) -> None:
    halves = fresh.create_adapter(rank=8, seed=3)
    whole = fresh.create_adapter(rank=8, seed=3)
    data = random_data(6, seed=1)
    fresh.forward_backward([AdapterBatch(halves, data[:3])])
    fresh.forward_backward([AdapterBatch(halves, data[3:])])
    fresh.forward_backward([AdapterBatch(whole, data)])
    for a, b in zip(
        slot_leaves(fresh._grads, halves), slot_leaves(fresh._grads, whole), strict=True
    ):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    fresh.optim_steps({halves: AdamParams(1e-3), whole: AdamParams(1e-3)})
    for a, b in zip(slot_leaves(fresh._lora, halves), slot_leaves(fresh._lora, whole), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_micro_batching_matches_one_batch(fresh: TrainingEngine, tiny_qwen3_dir: Path) -> None:
    small = TrainingEngine(
        tiny_qwen3_dir, EngineConfig(max_lora_rank=8, batch_buckets=(2,), tokens_per_micro_batch=32)
    )
    data = random_data(5, seed=2, lo=8, hi=16)  # 5 rows × 16 > 32 tokens: several micro-batches
    outs = []
    for eng in (fresh, small):
        slot = eng.create_adapter(rank=8, seed=4)
        outs.append((eng.forward_backward([AdapterBatch(slot, data)])[0], eng, slot))
    (big_out, big, s1), (small_out, sm, s2) = outs
    assert big_out.metrics["loss:sum"] == pytest.approx(small_out.metrics["loss:sum"], rel=1e-5)
    for a, b in zip(big_out.outputs, small_out.outputs, strict=True):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    for a, b in zip(slot_leaves(big._grads, s1), slot_leaves(sm._grads, s2), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_step_on_one_adapter_leaves_another_bit_identical(fresh: TrainingEngine) -> None:
    a = fresh.create_adapter(rank=8, seed=5)
    b = fresh.create_adapter(rank=4, seed=6)
    data = random_data(2, seed=3)
    fresh.forward_backward([AdapterBatch(a, data), AdapterBatch(b, data)])
    fresh.optim_steps({a: AdamParams(1e-2), b: AdamParams(1e-2)})  # b gets moments
    fresh.forward_backward([AdapterBatch(a, data), AdapterBatch(b, data)])  # b: pending grads
    trees = (fresh._lora, fresh._opt.m, fresh._opt.v, fresh._grads)
    before = [slot_leaves(t, b) for t in trees]
    count_b = fresh.step_count(b)
    fresh.optim_step(a, AdamParams(5e-2, weight_decay=0.1))
    after = [slot_leaves(t, b) for t in (fresh._lora, fresh._opt.m, fresh._opt.v, fresh._grads)]
    for xs, ys in zip(before, after, strict=True):
        for x, y in zip(xs, ys, strict=True):
            np.testing.assert_array_equal(x, y)
    assert fresh.step_count(b) == count_b
    assert all(not np.any(g) for g in slot_leaves(fresh._grads, a))  # a's accumulator cleared


def test_mixed_adapter_batch_equals_separate_calls(fresh: TrainingEngine) -> None:
    a = fresh.create_adapter(rank=8, seed=7)
    b = fresh.create_adapter(rank=8, seed=8)
    warm = random_data(2, seed=4)
    fresh.forward_backward([AdapterBatch(a, warm), AdapterBatch(b, warm[::-1])])
    fresh.optim_steps({a: AdamParams(1e-2), b: AdamParams(3e-2)})  # make B factors non-zero
    data_a, data_b = random_data(3, seed=5), random_data(2, seed=6)
    base_data = random_data(2, seed=7)
    mixed = fresh.forward(
        [AdapterBatch(a, data_a), AdapterBatch(None, base_data), AdapterBatch(b, data_b)]
    )
    alone = [
        fresh.forward([AdapterBatch(s, d)])[0]
        for s, d in ((a, data_a), (None, base_data), (b, data_b))
    ]
    for m, s in zip(mixed, alone, strict=True):
        assert m.metrics["loss:sum"] == pytest.approx(s.metrics["loss:sum"], rel=1e-5)
        for x, y in zip(m.outputs, s.outputs, strict=True):
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)
    # a trained adapter changes its rows, and the base rows stay the base model's
    assert (
        abs(
            mixed[0].metrics["loss:sum"]
            - fresh.forward([AdapterBatch(None, data_a)])[0].metrics["loss:sum"]
        )
        > 1e-3
    )


def test_fresh_adapter_reproduces_the_base_model(fresh: TrainingEngine) -> None:
    slot = fresh.create_adapter(rank=8, seed=9)
    data = random_data(3, seed=8)
    base = fresh.forward([AdapterBatch(None, data)])[0]
    lora = fresh.forward([AdapterBatch(slot, data)])[0]
    for x, y in zip(base.outputs, lora.outputs, strict=True):
        np.testing.assert_array_equal(x.logprobs, y.logprobs)


def slot_state(engine: TrainingEngine, slot: int) -> list[np.ndarray]:
    """Every value the engine keeps for ``slot``: factors, scalings, moments, count, gradients."""
    scalings = [x for path, x in jax.tree.leaves_with_path(engine._rest) if "lora_scaling" in jax.tree_util.keystr(path)]  # fmt: skip
    trees = (engine._lora, scalings, engine._opt.m, engine._opt.v, engine._opt.count, engine._grads)
    return [leaf for tree in trees for leaf in slot_leaves(tree, slot)]


def test_free_adapter_clears_state_and_slot_is_reused(fresh: TrainingEngine) -> None:
    slot, other = fresh.create_adapter(rank=8, seed=10), fresh.create_adapter(rank=4, seed=11)
    for s in (slot, other):
        fresh.forward_backward([AdapterBatch(s, random_data(2, seed=9))])
        fresh.optim_step(s, AdamParams(1e-2))
        fresh.forward_backward([AdapterBatch(s, random_data(2, seed=9))])
    kept = slot_state(fresh, other)
    fresh.free_adapter(slot)
    assert all(not np.any(x) for x in slot_state(fresh, slot))
    for before, after in zip(kept, slot_state(fresh, other), strict=True):
        np.testing.assert_array_equal(before, after)  # the other slot is untouched
    assert fresh.create_adapter(rank=2, seed=0) == slot
    with pytest.raises(AdapterError, match="not an allocated"):
        fresh.optim_step(other + 1)


def test_slot_allocation_errors(fresh: TrainingEngine) -> None:
    with pytest.raises(AdapterError, match="max_lora_rank"):
        fresh.create_adapter(rank=9)
    for _ in range(CONFIG.max_lora_adapters):
        fresh.create_adapter(rank=1, seed=0)
    with pytest.raises(NoFreeSlotError, match="in use"):
        fresh.create_adapter(rank=1)


@pytest.mark.parametrize(
    ("group", "message"),
    [
        (AdapterBatch(1, [sft_datum(np.array([1, 2, 5000]))]), "target_tokens holds token id 5000"),
        (
            AdapterBatch(
                1, [DatumArrays(np.array([3000, 1]), {"target_tokens": np.array([1, 2])})]
            ),
            r"data\[0\].input_tokens holds token id 3000",
        ),
        (
            AdapterBatch(
                1, [DatumArrays(np.array([1, 2, 3]), {"target_tokens": np.array([1, 2])})]
            ),
            "target_tokens has 2 positions but input_tokens has 3",
        ),
        (
            AdapterBatch(1, [sft_datum(np.array([1, 2, 3]), np.ones(3))]),
            r"weights has shape \(3,\), expected \(2,\)",
        ),
        (AdapterBatch(1, [sft_datum(np.array([1, 2, 3]))], loss_fn="nope"), "unknown loss_fn"),
        (
            AdapterBatch(1, [sft_datum(np.array([1, 2, 3]))], loss_fn="ppo"),
            "requires loss_fn_inputs logprobs, advantages",
        ),
        (
            AdapterBatch(1, [sft_datum(np.array([1, 2, 3]))], loss_fn_config={"beta": 1.0}),
            "loss_fn_config.beta is not accepted",
        ),
        (AdapterBatch(1, []), r"groups\[0\].data must not be empty"),
        (AdapterBatch(3, [sft_datum(np.array([1, 2, 3]))]), "slot 3 is not an allocated"),
        (AdapterBatch(None, [sft_datum(np.array([1, 2, 3]))]), "slot None is not an allocated"),
    ],
)
def test_bad_input_is_rejected_naming_the_field(
    fresh: TrainingEngine, group: AdapterBatch, message: str
) -> None:
    assert fresh.create_adapter(rank=2, seed=0) == 1
    with pytest.raises(InputError, match=message) as info:
        fresh.forward_backward([group])
    assert isinstance(info.value, TxEngineError)
    assert info.value.category == "user"
    with pytest.raises(InputError, match="at least one"):
        fresh.forward([])
    with pytest.raises(InputError, match=r"adam_params.beta1"):
        AdamParams(beta1=1.0)


@pytest.mark.parametrize(
    ("rank", "alpha", "flags"),
    [(8, 16.0, (True, True, True)), (3, 5.0, (False, True, False)), (1, 0.5, (True, False, True))],
)
def test_a_created_adapter_is_what_init_adapter_draws(
    fresh: TrainingEngine, rank: int, alpha: float, flags: tuple[bool, bool, bool]
) -> None:
    """The engine's compiled slot write (:mod:`tx_engine.slot_programs`) and the reference
    :func:`~tx_engine.layers.lora.init_adapter` on the merged model give the same factors and
    scalings, bit for bit, for a free slot and for one in use, for every choice of targets."""
    first = fresh.create_adapter(rank=8, seed=1)
    attn, mlp, unembed = flags
    kwargs = {"rank": rank, "alpha": alpha, "seed": 77, "train_attn": attn, "train_mlp": mlp, "train_unembed": unembed}  # fmt: skip
    model = fresh._model()  # before: its variables are the engine's current arrays
    slot = fresh.create_adapter(**kwargs)  # type: ignore[arg-type]
    lora_lib.init_adapter(model, slot, **kwargs)  # type: ignore[arg-type]
    # Re-initialising a slot in use (as load_adapter does) overwrites all of it.
    fresh._init_slot(first, LoraConfig(rank, alpha, 78, attn, mlp, unembed))
    lora_lib.init_adapter(model, first, **{**kwargs, "seed": 78})  # type: ignore[arg-type]
    _, lora, rest = nnx.split(model, lora_lib.LoRAParam, ...)
    for want, got in ((lora, fresh._lora), (rest, fresh._rest)):
        for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
