"""Conformance of the array-carrying types with the SDK.

In SDK 0.38.0 ``TensorData``, ``Datum``, ``ForwardBackward*``, ``SampleResponse``,
``SampledSequence``, ``PromptAltTokens`` and the provenance spans are frozen *dataclasses*
(they travel as protobuf); the JSON forms of ``TensorData``/``Datum``/``ForwardBackwardInput``
are pydantic models in ``tinker.types._pydantic_types``. We check both: tx models read the SDK
dataclasses (``model_validate(obj)`` through attributes) with identical values, the SDK
dataclasses rebuilt from tx values agree, and the JSON forms round-trip both ways.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import tx_types as X  # noqa: N812  (X mirrors the SDK-side alias T)

T = pytest.importorskip("tinker.types")
from tinker.types._pydantic_types.datum import Datum as SdkDatumModel  # noqa: E402
from tinker.types._pydantic_types.forward_backward_input import (  # noqa: E402
    ForwardBackwardInput as SdkForwardBackwardInputModel,
)
from tinker.types._pydantic_types.tensor_data import TensorData as SdkTensorDataModel  # noqa: E402
from tinker.types.topk_logprobs import TopkLogprobs  # noqa: E402


def _wire(obj: Any) -> dict[str, Any]:
    dumped: dict[str, Any] = obj.model_dump(mode="json", exclude_none=True)
    return dumped


TENSORS = [
    {"data": [1, 2, 3], "dtype": "int64"},
    {"data": [0.5, -1.25, 3.0, 4.0], "dtype": "float32", "shape": [2, 2]},
    {"data": [7], "dtype": "int64", "shape": []},
    {"data": [], "dtype": "float32", "shape": [0, 3]},
    {
        "data": [5, 9],
        "dtype": "int64",
        "shape": [3, 4],
        "sparse_crow_indices": [0, 1, 1, 2],
        "sparse_col_indices": [3, 0],
    },
]


@pytest.mark.parametrize("fields", TENSORS)
def test_tensor_data_json_round_trips_with_sdk_model(fields: dict[str, Any]) -> None:
    sdk = SdkTensorDataModel(**fields)
    tx = X.TensorData.model_validate(_wire(sdk))
    assert _wire(tx) == _wire(sdk)
    assert _wire(SdkTensorDataModel.model_validate(_wire(tx))) == _wire(sdk)
    assert X.TensorData.model_validate_json(sdk.model_dump_json()) == tx


@pytest.mark.parametrize("fields", [f for f in TENSORS if "sparse_crow_indices" not in f])
def test_tensor_data_matches_sdk_dataclass(fields: dict[str, Any]) -> None:
    sdk = T.TensorData(**fields)
    tx = X.TensorData.model_validate(sdk)
    np.testing.assert_array_equal(tx.to_numpy(), sdk.to_numpy())
    assert tx.to_numpy().dtype == sdk.to_numpy().dtype
    assert tx.tolist() == sdk.tolist()
    back = T.TensorData(data=tx.data, dtype=tx.dtype, shape=tx.shape)
    np.testing.assert_array_equal(back.to_numpy(), tx.to_numpy())


@pytest.mark.parametrize(
    "array",
    [
        np.arange(6, dtype=np.int32).reshape(2, 3),
        np.linspace(-1, 1, 5, dtype=np.float64),
        np.array([[1.5]], dtype=np.float16),
        np.zeros((0,), dtype=np.int64),
    ],
)
def test_tensor_data_from_numpy_matches_sdk(array: np.ndarray) -> None:
    sdk, tx = T.TensorData.from_numpy(array), X.TensorData.from_numpy(array)
    assert tx.dtype == sdk.dtype
    assert tx.shape == sdk.shape
    assert tx.data == sdk.data
    sdk_model = SdkTensorDataModel.from_numpy(array)
    assert _wire(tx) == _wire(sdk_model)


def _sdk_datum() -> Any:
    return T.Datum(
        model_input=T.ModelInput.from_ints([10, 11, 12, 13]),
        loss_fn_inputs={
            "target_tokens": [11, 12, 13, 14],
            "weights": [0, 1, 1, 0.5],
            "advantages": np.array([1.0, -1.0, 0.5, 0.0], dtype=np.float32),
            "logprobs": [-0.1, -0.2, -0.3, -0.4],
        },
    )


def test_datum_reads_sdk_dataclass() -> None:
    sdk = _sdk_datum()
    tx = X.Datum.model_validate(sdk)
    assert tx.model_input.to_ints() == sdk.model_input.to_ints()
    assert set(tx.loss_fn_inputs) == set(sdk.loss_fn_inputs)
    for key, value in sdk.loss_fn_inputs.items():
        ours = tx.loss_fn_inputs[key]
        assert ours.dtype == value.dtype, key
        assert ours.shape == value.shape, key
        np.testing.assert_array_equal(ours.to_numpy(), value.to_numpy())


def test_datum_list_coercion_matches_sdk() -> None:
    """The same plain-list inputs get the same dtypes and values as in the SDK (spec §6.3)."""
    inputs = {
        "target_tokens": [1.0, 2.0, 3.0],
        "weights": [1, 0, 1],
        "advantages": [1, 2, 3],
        "logprobs": [-1, -2, -3],
        "clip_low_threshold": [0.8, 0.8, 0.8],
        "clip_high_threshold": [1, 1, 1],
        "sequence_ratio_mask": [1, 1, 0],
    }
    sdk = T.Datum(model_input=T.ModelInput.from_ints([0, 1, 2]), loss_fn_inputs=inputs)
    tx = X.Datum(model_input=X.ModelInput.from_ints([0, 1, 2]), loss_fn_inputs=inputs)
    for key, value in sdk.loss_fn_inputs.items():
        assert tx.loss_fn_inputs[key].dtype == value.dtype, key
        np.testing.assert_array_equal(tx.loss_fn_inputs[key].to_numpy(), value.to_numpy())


def test_datum_json_round_trips_with_sdk_model() -> None:
    sdk = SdkDatumModel(
        model_input=T.ModelInput.from_ints([1, 2]),
        loss_fn_inputs={"target_tokens": [2, 3], "weights": np.array([1.0, 0.0])},
    )
    tx = X.Datum.model_validate_json(sdk.model_dump_json(exclude_none=True))
    assert _wire(tx) == _wire(sdk)
    assert _wire(SdkDatumModel.model_validate(_wire(tx))) == _wire(sdk)


def test_datum_provenance_reads_sdk_dataclass() -> None:
    sdk = _sdk_datum().with_provenance(
        model_input=[
            T.PromptProvenanceSpan(sequence_id="q0", length=2),
            T.SampledProvenanceSpan(sequence_id="q0", offset=1, length=2),
        ],
        loss_fn_inputs=[T.SampledProvenanceSpan(sequence_id="q0", length=4)],
    )
    tx = X.Datum.model_validate(sdk)
    assert tx.model_input_spans is not None
    assert tx.loss_fn_input_spans is not None
    assert [type(s).__name__ for s in tx.model_input_spans] == [
        "PromptProvenanceSpan",
        "SampledProvenanceSpan",
    ]
    assert [(s.sequence_id, s.offset, s.length) for s in tx.model_input_spans] == [
        ("q0", 0, 2),
        ("q0", 1, 2),
    ]
    assert X.Datum.model_validate_json(tx.model_dump_json()) == tx


def test_forward_backward_input_json_round_trips_with_sdk_model() -> None:
    sdk = SdkForwardBackwardInputModel(
        data=[
            SdkDatumModel(
                model_input=T.ModelInput.from_ints([1]), loss_fn_inputs={"target_tokens": [2]}
            )
        ],
        loss_fn="ppo",
        loss_fn_config={"clip_low_threshold": 0.7, "loss_id": "abc"},
    )
    tx = X.ForwardBackwardInput.model_validate(_wire(sdk))
    assert _wire(tx) == _wire(sdk)
    assert _wire(SdkForwardBackwardInputModel.model_validate(_wire(tx))) == _wire(sdk)


def test_forward_backward_requests_read_sdk_dataclasses() -> None:
    fbi = T.ForwardBackwardInput(
        data=[_sdk_datum()], loss_fn="cross_entropy", loss_fn_config={"a": 1.0}
    )
    req = X.ForwardBackwardRequest.model_validate(
        T.ForwardBackwardRequest(forward_backward_input=fbi, model_id="s:train:0", seq_id=3)
    )
    assert (req.model_id, req.seq_id, req.forward_backward_input.loss_fn) == (
        "s:train:0",
        3,
        "cross_entropy",
    )
    assert req.forward_backward_input.loss_fn_config == {"a": 1.0}
    fwd = X.ForwardRequest.model_validate(T.ForwardRequest(forward_input=fbi, model_id="m"))
    assert fwd.forward_input.data[0].model_input.length == 4


def test_forward_backward_output_reads_sdk_dataclass() -> None:
    sdk = T.ForwardBackwardOutput(
        loss_fn_output_type="ArrayRecord",
        loss_fn_outputs=[
            {"logprobs": T.TensorData(data=[-0.5, -1.5], dtype="float32", shape=[2])},
            {"logprobs": T.TensorData(data=[-0.25], dtype="float32", shape=[1])},
        ],
        metrics={"loss:sum": 2.25},
    )
    tx = X.ForwardBackwardOutput.model_validate(sdk)
    assert tx.metrics == {"loss:sum": 2.25}
    assert [o["logprobs"].tolist() for o in tx.loss_fn_outputs] == [[-0.5, -1.5], [-0.25]]
    back = T.ForwardBackwardOutput(
        loss_fn_output_type=tx.loss_fn_output_type,
        loss_fn_outputs=[
            {k: T.TensorData(**v.model_dump()) for k, v in o.items()} for o in tx.loss_fn_outputs
        ],
        metrics=tx.metrics,
    )
    assert [o["logprobs"].tolist() for o in back.loss_fn_outputs] == [[-0.5, -1.5], [-0.25]]


def _sdk_sample_response() -> Any:
    ids = np.array([[5, 6], [7, 0]], dtype=np.int32)
    lps = np.array([[-0.1, -0.2], [-0.3, -99999.0]], dtype=np.float32)
    seq = T.SampledSequence(
        stop_reason="stop",
        sequence_id="q0",
        tokens_np=np.array([5, 7], dtype=np.int32),
        logprobs_np=np.array([-0.5, -0.75], dtype=np.float32),
        topk_logprobs_np=TopkLogprobs(token_ids=ids, logprobs=lps),
    )
    return T.SampleResponse(
        sequences=[
            seq,
            T.SampledSequence(
                stop_reason="length", sequence_id="q1", tokens_np=np.array([1], dtype=np.int32)
            ),
        ],
        prompt_logprobs_np=np.array([np.nan, -1.5, -2.0], dtype=np.float32),
        target_prompt_logprobs=T.TensorData(data=[-1.0, 0.0], dtype="float32", shape=[2, 1]),
        prompt_cache_hit_tokens=2,
        prompt_alt_tokens=T.PromptAltTokens(
            tokens=T.TensorData(data=[3, 4], dtype="int64", shape=[2, 1]),
            logprobs=T.TensorData(data=[-0.5, -0.5], dtype="float32", shape=[2, 1]),
        ),
    )


def test_sample_response_reads_sdk_dataclass() -> None:
    sdk = _sdk_sample_response()
    tx = X.SampleResponse.model_validate(sdk)
    assert [s.tokens for s in tx.sequences] == [[5, 7], [1]]
    assert [s.sequence_id for s in tx.sequences] == ["q0", "q1"]
    assert [s.stop_reason for s in tx.sequences] == ["stop", "length"]
    assert tx.sequences[0].logprobs == sdk.sequences[0].logprobs
    assert tx.sequences[0].topk_logprobs == [
        [(5, pytest.approx(-0.1)), (6, pytest.approx(-0.2))],
        [(7, pytest.approx(-0.3))],
    ]
    assert tx.prompt_logprobs == [None, -1.5, -2.0]
    assert tx.prompt_cache_hit_tokens == 2
    assert tx.target_prompt_logprobs is not None
    assert tx.target_prompt_logprobs.tolist() == [[-1.0], [0.0]]
    assert tx.prompt_alt_tokens is not None
    assert tx.prompt_alt_tokens.tokens.tolist() == [[3], [4]]
    lp = tx.prompt_logprobs_np
    assert lp is not None
    assert math.isnan(lp[0])
    assert lp.dtype == np.float32
    np.testing.assert_array_equal(tx.sequences[0].tokens_np, sdk.sequences[0].tokens_np)
    np.testing.assert_array_equal(tx.sequences[0].logprobs_np, sdk.sequences[0].logprobs_np)
    assert X.SampleResponse.model_validate_json(tx.model_dump_json()) == tx


def test_sdk_sample_response_rebuilt_from_tx_agrees() -> None:
    tx = X.SampleResponse.model_validate(_sdk_sample_response())
    sdk = T.SampleResponse(
        sequences=[
            T.SampledSequence(
                stop_reason=s.stop_reason,
                sequence_id=s.sequence_id or "",
                tokens_np=s.tokens_np,
                logprobs_np=s.logprobs_np,
            )
            for s in tx.sequences
        ],
        prompt_logprobs_np=tx.prompt_logprobs_np,
        prompt_cache_hit_tokens=tx.prompt_cache_hit_tokens,
    )
    assert sdk.prompt_logprobs == tx.prompt_logprobs
    assert [s.tokens for s in sdk.sequences] == [s.tokens for s in tx.sequences]
    assert [s.logprobs for s in sdk.sequences] == [s.logprobs for s in tx.sequences]
