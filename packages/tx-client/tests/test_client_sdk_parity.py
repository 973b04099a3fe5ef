"""Client-side computations equal the official SDK's on the same inputs.

Metric reduction is compared with ``tinker.lib.chunked_fwdbwd_helpers.combine_fwd_bwd_output_
results``; chunk boundaries with the SDK's own ``TrainingClient._chunked_requests_generator``
(called unbound on a stand-in holding only the client config it reads).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import tinker
from hypothesis import given, settings
from hypothesis import strategies as st
from tinker.lib.chunked_fwdbwd_helpers import combine_fwd_bwd_output_results

from tx_client._chunking import chunk_data, estimate_datum_bytes
from tx_client._metrics import combine_outputs
from tx_types import ClientConfigResponse, Datum, ForwardBackwardOutput, ModelInput, TensorData

REDUCTIONS = ["sum", "mean", "min", "max", "slack", "hash2", "unique", "bogus"]


def _metrics_strategy() -> st.SearchStrategy[list[tuple[int, dict[str, float]]]]:
    value = st.floats(-1e6, 1e6, allow_nan=False).map(lambda v: round(v, 3))
    key = st.tuples(st.sampled_from(["loss", "acc", "h"]), st.sampled_from(REDUCTIONS)).map(
        lambda t: f"{t[0]}:{t[1]}"
    )
    chunk = st.tuples(st.integers(1, 5), st.dictionaries(key, value, max_size=6))
    return st.lists(chunk, min_size=1, max_size=5)


def _outputs(n: int) -> list[dict[str, Any]]:
    return [
        {"logprobs": TensorData(data=[-float(i)], dtype="float32", shape=[1])} for i in range(n)
    ]


@settings(max_examples=150, deadline=None)
@given(chunks=_metrics_strategy())
def test_metric_reduction_equals_sdk(chunks: list[tuple[int, dict[str, float]]]) -> None:
    ours = [
        ForwardBackwardOutput(
            loss_fn_output_type="ArrayRecord", loss_fn_outputs=_outputs(n), metrics=m
        )
        for n, m in chunks
    ]
    theirs = [
        tinker.types.ForwardBackwardOutput(
            loss_fn_output_type=o.loss_fn_output_type,
            loss_fn_outputs=[
                {k: sdk_tensor(v) for k, v in out.items()} for out in o.loss_fn_outputs
            ],
            metrics=dict(o.metrics),
        )
        for o in ours
    ]
    expected = combine_fwd_bwd_output_results(theirs)
    merged = combine_outputs(ours)
    assert merged.metrics == pytest.approx(expected.metrics, rel=0, abs=0)
    assert set(merged.metrics) == set(expected.metrics)
    assert len(merged.loss_fn_outputs) == sum(n for n, _ in chunks)
    assert [o["logprobs"].data for o in merged.loss_fn_outputs] == [
        o["logprobs"].data for o in expected.loss_fn_outputs
    ]


def test_metric_key_without_one_colon_is_rejected() -> None:
    bad = ForwardBackwardOutput.model_construct(
        loss_fn_output_type="x", loss_fn_outputs=[], metrics={"loss": 1.0}
    )
    with pytest.raises(ValueError, match="exactly one ':'"):
        combine_outputs([bad])


def random_datum(rng: np.random.Generator) -> Datum:
    """A datum with 1-D targets, or sparse 2-D ``[N, K]`` targets and weights."""
    n = int(rng.integers(1, 40))
    tokens = rng.integers(0, 1000, n).tolist()
    if rng.random() < 0.3:
        targets = np.zeros((n, 4), np.int64)
        targets[:, 0] = rng.integers(1, 1000, n)
        return Datum(
            model_input=ModelInput.from_ints(tokens),
            loss_fn_inputs={
                "target_tokens": TensorData.from_numpy_sparse(targets),
                "weights": TensorData.from_numpy_sparse((targets > 0).astype(np.float32)),
            },
        )
    return Datum(
        model_input=ModelInput.from_ints(tokens),
        loss_fn_inputs={
            "target_tokens": rng.integers(0, 1000, n),
            "weights": rng.random(n).astype(np.float32),
        },
    )


def sdk_tensor(t: TensorData) -> tinker.types.TensorData:
    return tinker.types.TensorData(
        data=list(t.data), dtype=t.dtype, shape=t.shape,
        sparse_crow_indices=t.sparse_crow_indices, sparse_col_indices=t.sparse_col_indices,
    )  # fmt: skip


def to_sdk(datum: Datum) -> tinker.types.Datum:
    """The same datum as an SDK object (tokens and tensors copied field by field)."""
    return tinker.types.Datum(
        model_input=tinker.types.ModelInput.from_ints(datum.model_input.to_ints()),
        loss_fn_inputs={k: sdk_tensor(v) for k, v in datum.loss_fn_inputs.items()},
    )


@pytest.mark.parametrize(
    ("max_len", "max_bytes"), [(1024, 5_000_000), (3, 5_000_000), (1024, 400), (4, 250), (2, 1)]
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunk_boundaries_equal_sdk(max_len: int, max_bytes: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    data = [random_datum(rng) for _ in range(25)]
    config = tinker.types.ClientConfigResponse(
        fwdbwd_max_chunk_len=max_len, fwdbwd_max_chunk_bytes_count=max_bytes
    )
    fake = SimpleNamespace(holder=SimpleNamespace(_client_config=config))
    sdk_chunks = list(
        tinker.TrainingClient._chunked_requests_generator(fake, [to_sdk(d) for d in data])
    )  # type: ignore[arg-type]
    ours = chunk_data(data, max_len, max_bytes)
    assert [len(c) for c in ours] == [len(c.data) for c in sdk_chunks]
    assert [sum(map(estimate_datum_bytes, c)) for c in ours] == [
        c.estimated_bytes_count for c in sdk_chunks
    ]


def test_chunking_rejects_bad_limits() -> None:
    with pytest.raises(ValueError, match="fwdbwd_max_chunk_len"):
        chunk_data([], 0, 10)
    assert ClientConfigResponse().fwdbwd_max_chunk_len == 1024
