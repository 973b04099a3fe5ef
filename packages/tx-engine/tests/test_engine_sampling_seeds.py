"""Per-row randomness and parameters: reproducibility, batch independence, no recompilation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tx_engine.sampling import (
    RowSamplingParams,
    SamplingRow,
    decode_keys,
    resolve_seed,
    row_key_data,
    sample_tokens,
)

VOCAB = 24
BATCH = 8
STEPS = 12


def _logits(seed: int, rows: int) -> np.ndarray:
    """Flat-ish logits so that sampled sequences vary a lot between keys."""
    return np.random.default_rng(seed).normal(size=(rows, VOCAB)).astype(np.float32)


def _traced_step() -> tuple[list[int], jax.stages.Wrapped]:
    traces: list[int] = []

    def step(
        logits_bv: jax.Array, params: RowSamplingParams, step_b: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        traces.append(1)  # runs only while tracing
        return sample_tokens(logits_bv, params, decode_keys(params.key_data, step_b))

    return traces, jax.jit(step)


_TRACES, _STEP = _traced_step()


def _generate(logits_bv: np.ndarray, rows: list[SamplingRow]) -> np.ndarray:
    """``[B, STEPS]`` tokens; every step reuses the row's logits (the kernel sees only logits).

    Batches are padded to `BATCH` rows, the way `step.py` buckets them, so one compile serves
    the module.
    """
    params = RowSamplingParams.stack(rows, pad_to=BATCH)
    padded = np.zeros((BATCH, VOCAB), np.float32)
    padded[: len(rows)] = logits_bv
    out = [
        np.asarray(_STEP(padded, params, jnp.full(BATCH, t, jnp.int32))[0]) for t in range(STEPS)
    ]
    return np.stack(out, axis=1)[: len(rows)]


def test_seed_is_independent_of_batch_composition_and_row_position() -> None:
    row = SamplingRow(0.9, top_k=10, top_p=0.95, seed=1234, sample_index=2)
    row_logits = _logits(0, 1)
    alone = _generate(row_logits, [row])[0]

    # The same row at position 5 of 8, beside other seeds, settings and logits.
    others = [SamplingRow(1.3, -1, 1.0, seed=s) for s in range(4)]
    others += [SamplingRow(0.0), SamplingRow(0.5, 3, 0.5, seed=9), SamplingRow(1.0, seed=77)]
    rows = [*others[:5], row, *others[5:]]
    logits = _logits(1, 8)
    logits[5] = row_logits[0]
    np.testing.assert_array_equal(_generate(logits, rows)[5], alone)

    # And in a batch of its own, unpadded: another batch size, another compiled shape.
    params = RowSamplingParams.stack([row])
    unpadded = [int(_STEP(row_logits, params, jnp.array([t]))[0][0]) for t in range(STEPS)]
    np.testing.assert_array_equal(unpadded, alone)
    assert len(set(alone.tolist())) > 2  # the sequence really is random, not constant


def test_filtering_rows_do_not_change_unfiltered_rows() -> None:
    """The batch-wide skip of the sort (no row filters) gives the same tokens as the sort path."""
    plain = [SamplingRow(1.0, seed=s) for s in range(3)]
    logits = _logits(2, 4)
    without = _generate(logits[:3], plain)
    with_filter = _generate(logits, [*plain, SamplingRow(1.0, top_k=2, seed=5)])
    np.testing.assert_array_equal(with_filter[:3], without)


def test_same_seed_reproduces_and_sample_indices_differ() -> None:
    rows = SamplingRow.for_request(num_samples=4, temperature=1.0, seed=99)
    logits = np.repeat(_logits(3, 1), 4, axis=0)
    first = _generate(logits, rows)
    np.testing.assert_array_equal(_generate(logits, rows), first)
    assert len({tuple(r) for r in first.tolist()}) == 4  # num_samples > 1 must differ
    other_seed = _generate(logits, SamplingRow.for_request(num_samples=4, seed=100))
    assert not np.array_equal(other_seed, first)


def test_steps_use_different_randomness() -> None:
    key = row_key_data(7, 0)[None]
    keys = np.asarray(decode_keys(np.repeat(key, 3, 0), np.array([0, 1, 0])))
    assert not np.array_equal(keys[0], keys[1])
    np.testing.assert_array_equal(keys[0], keys[2])


def test_no_retrace_when_values_change() -> None:
    """New temperature / top-k / top-p / seed values reuse the one compiled step."""
    logits = _logits(4, 6)
    _generate(logits, [SamplingRow(1.0, seed=s) for s in range(6)])
    traces_before = len(_TRACES)
    settings = [
        (0.0, -1, 1.0),
        (0.3, 2, 0.4),
        (1.7, 50, 0.99),
        (1.0, 1, 1e-3),
        (2.5, -1, 0.7),
        (1.0, 5, 1.0),
    ]
    for shift in range(3):
        rows = [
            SamplingRow(t, k, p, seed=1000 * shift + i, sample_index=shift)
            for i, (t, k, p) in enumerate(settings[shift:] + settings[:shift])
        ]
        _generate(logits, rows)
    assert len(_TRACES) == traces_before
    assert traces_before >= 1


def test_resolve_seed_and_key_derivation() -> None:
    assert resolve_seed(5) == 5
    assert resolve_seed(None) != resolve_seed(None)  # fresh 63-bit randomness
    rows = SamplingRow.for_request(num_samples=3, seed=None)
    assert len({r.seed for r in rows}) == 1  # one seed per request...
    assert [r.sample_index for r in rows] == [0, 1, 2]  # ...samples told apart by index
    np.testing.assert_array_equal(row_key_data(2**70, 1), row_key_data(2**70, 1))
    assert not np.array_equal(row_key_data(-1, 0), row_key_data(1, 0))
    assert row_key_data(3, 0).dtype == np.uint32
    with pytest.raises(ValueError, match="seed"):
        row_key_data(2**200, 0)
    with pytest.raises(ValueError, match="seed"):
        resolve_seed("7")  # type: ignore[arg-type]
    assert resolve_seed(-(2**127)) == -(2**127)  # the wire's int is checked up front, not
    for seed in (2**127, -(2**127) - 1):  # when a batch's keys are built mid-run
        with pytest.raises(ValueError, match="seed: must fit in a signed 128-bit integer"):
            resolve_seed(seed)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"sample_index": -1}, "sample_index"),
    ],
)
def test_bad_row_values_name_the_field(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingRow(**kwargs)  # type: ignore[arg-type]


def test_stack_pads_with_greedy_rows_and_checks_sizes() -> None:
    params = RowSamplingParams.stack([SamplingRow(0.7, 3, 0.9, seed=1)], pad_to=4)
    assert params.batch_size == 4
    np.testing.assert_array_equal(params.temperature, np.float32([0.7, 0.0, 0.0, 0.0]))
    np.testing.assert_array_equal(params.top_k, [3, -1, -1, -1])
    assert params.key_data.shape == (4, 2)
    huge_k = RowSamplingParams.stack([SamplingRow(top_k=2**40)])  # k >= vocab: no filter
    np.testing.assert_array_equal(huge_k.top_k, [np.iinfo(np.int32).max])
    with pytest.raises(ValueError, match="pad_to"):
        RowSamplingParams.stack([SamplingRow(), SamplingRow()], pad_to=1)
    with pytest.raises(ValueError, match="num_samples"):
        SamplingRow.for_request(num_samples=0)
