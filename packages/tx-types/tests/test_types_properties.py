"""Property tests: round trips and invariants of ModelInput, TensorData, SamplingParams, Datum.

The JSON round trips also go through the SDK's models where one exists, so the properties are
checked against the reference implementation, not only against ourselves.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tx_types as X  # noqa: N812  (X mirrors the SDK-side alias T)

T = pytest.importorskip("tinker.types")
from tinker.types._pydantic_types.tensor_data import TensorData as SdkTensorDataModel  # noqa: E402

FAST = settings(max_examples=60, deadline=None)

token_ids = st.integers(min_value=0, max_value=2**31 - 1)
chunks = st.lists(st.lists(token_ids, max_size=12), max_size=5)
finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


def _wire(obj: Any) -> dict[str, Any]:
    dumped: dict[str, Any] = obj.model_dump(mode="json", exclude_none=True)
    return dumped


# ----------------------------------------------------------------------------- ModelInput
@FAST
@given(chunks, token_ids)
def test_model_input_invariants(token_chunks: list[list[int]], extra: int) -> None:
    mi = X.ModelInput(chunks=[X.EncodedTextChunk(tokens=c) for c in token_chunks])
    flat = [t for c in token_chunks for t in c]
    assert mi.length == len(flat) == len(mi.to_ints())
    assert mi.to_ints() == flat
    assert X.ModelInput.from_ints(flat).to_ints() == flat
    grown = mi.append_int(extra).append(X.EncodedTextChunk(tokens=[extra]))
    assert grown.length == mi.length + 2
    assert grown.to_ints() == [*flat, extra, extra]
    assert mi.length == len(flat)  # append returns a new object


@FAST
@given(chunks)
def test_model_input_round_trips_through_sdk(token_chunks: list[list[int]]) -> None:
    mi = X.ModelInput(chunks=[X.EncodedTextChunk(tokens=c) for c in token_chunks])
    sdk = T.ModelInput.model_validate_json(mi.model_dump_json(exclude_none=True))
    assert sdk.to_ints() == mi.to_ints()
    assert sdk.length == mi.length
    assert X.ModelInput.model_validate(_wire(sdk)) == mi
    assert X.ModelInput.empty().length == 0


# ----------------------------------------------------------------------------- TensorData
arrays = st.one_of(
    hnp.arrays(np.int64, hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5)),
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),
        elements=finite32,
    ),
)


@FAST
@given(arrays)
def test_tensor_data_numpy_round_trip(array: np.ndarray) -> None:
    td = X.TensorData.from_numpy(array)
    out = td.to_numpy()
    assert out.shape == array.shape
    assert out.dtype == array.dtype
    np.testing.assert_array_equal(out, array)
    assert td.tolist() == array.tolist()
    again = X.TensorData.model_validate_json(td.model_dump_json(exclude_none=True))
    assert again == td
    np.testing.assert_array_equal(SdkTensorDataModel.model_validate(_wire(td)).to_numpy(), array)


@FAST
@given(
    hnp.arrays(
        np.int64, hnp.array_shapes(min_dims=2, max_dims=2, max_side=6), elements=st.integers(-2, 3)
    ),
    st.integers(-1, 1),
)
def test_tensor_data_sparse_round_trip(array: np.ndarray, pad: int) -> None:
    td = X.TensorData.from_numpy_sparse(array, pad_value=pad)
    np.testing.assert_array_equal(td.to_numpy(pad_value=pad), array)
    if td.is_sparse:
        assert len(td.data) == int(np.count_nonzero(array != pad))
        assert (array.shape[0] + 1) + 2 * len(td.data) < array.size
    again = X.TensorData.model_validate_json(td.model_dump_json(exclude_none=True))
    np.testing.assert_array_equal(again.to_numpy(pad_value=pad), array)


# ----------------------------------------------------------------------------- SamplingParams
sampling_params = st.builds(
    X.SamplingParams,
    max_tokens=st.none() | st.integers(1, 10_000),
    seed=st.none() | st.integers(0, 2**63 - 1),
    stop=st.none()
    | st.text(max_size=5)
    | st.lists(st.text(min_size=1, max_size=5), max_size=3)
    | st.lists(token_ids, min_size=1, max_size=3),
    temperature=st.floats(0, 5, allow_nan=False),
    top_k=st.just(-1) | st.integers(1, 1000),
    top_p=st.floats(0, 1, exclude_min=True, allow_nan=False),
)


@FAST
@given(sampling_params)
def test_sampling_params_round_trip_through_sdk(params: X.SamplingParams) -> None:
    wire = _wire(params)
    assert "temperature" in wire
    assert "top_k" in wire
    assert "top_p" in wire
    sdk = T.SamplingParams.model_validate_json(params.model_dump_json(exclude_none=True))
    assert _wire(sdk) == wire
    assert X.SamplingParams.model_validate(_wire(sdk)) == params


# ----------------------------------------------------------------------------- Datum
@st.composite
def datums(draw: st.DrawFn) -> tuple[list[int], list[int], np.ndarray, int]:
    n = draw(st.integers(1, 16))
    k = draw(st.sampled_from([0, 1, 3]))  # 0 means 1-D targets
    tokens = draw(st.lists(token_ids, min_size=n, max_size=n))
    shape = (n,) if k == 0 else (n, k)
    targets = draw(hnp.arrays(np.int64, shape, elements=st.integers(0, 1000)))
    weights = draw(hnp.arrays(np.float32, shape, elements=finite32))
    return tokens, targets, weights, n


@FAST
@given(datums())
def test_datum_invariants_and_round_trip(
    case: tuple[list[int], np.ndarray, np.ndarray, int],
) -> None:
    tokens, targets, weights, n = case
    datum = X.Datum(
        model_input=X.ModelInput.from_ints(tokens),
        loss_fn_inputs={"target_tokens": targets.tolist(), "weights": weights},
    )
    tt, ww = datum.loss_fn_inputs["target_tokens"], datum.loss_fn_inputs["weights"]
    assert (tt.dtype, ww.dtype) == ("int64", "float32")
    assert tt.to_numpy().shape == ww.to_numpy().shape == targets.shape
    assert tt.to_numpy().shape[0] == datum.model_input.length == n
    np.testing.assert_array_equal(tt.to_numpy(), targets)
    np.testing.assert_array_equal(ww.to_numpy(), weights)
    assert X.Datum.model_validate_json(datum.model_dump_json(exclude_none=True)) == datum
    sdk = T.Datum(
        model_input=T.ModelInput.from_ints(tokens),
        loss_fn_inputs={"target_tokens": targets.tolist(), "weights": weights},
    )
    assert X.Datum.model_validate(sdk) == datum
