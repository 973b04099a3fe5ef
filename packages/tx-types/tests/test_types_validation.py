"""Invalid input is rejected with an error that names the offending field.

One test per rule; each asserts the field name appears in the error text (pydantic puts the
location in the message, model-level checks write the field names into their message).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

import tx_types as X  # noqa: N812  (X mirrors the SDK-side alias T)


def _error(build: Callable[[], Any]) -> str:
    with pytest.raises(ValidationError) as info:
        build()
    return str(info.value)


def _datum(tokens: list[int], **inputs: Any) -> X.Datum:
    return X.Datum(model_input=X.ModelInput.from_ints(tokens), loss_fn_inputs=inputs)


# ----------------------------------------------------------------------------- sampling
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": -2}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": [1, "a"]}, "stop"),
        ({"stop": ["a", 2]}, "stop"),
        ({"stop": [-1]}, "stop"),
        ({"stop": [1.5]}, "stop"),
    ],
)
def test_sampling_params_rejects(kwargs: dict[str, Any], field: str) -> None:
    assert field in _error(lambda: X.SamplingParams(**kwargs))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0.0},
        {"top_k": -1},
        {"top_k": 1},
        {"top_p": 1.0},
        {"top_p": 1e-6},
        {"stop": []},
        {"stop": ""},
        {"max_tokens": 1},
        {"seed": 0},
    ],
)
def test_sampling_params_accepts_boundaries(kwargs: dict[str, Any]) -> None:
    X.SamplingParams(**kwargs)


def _sample_request(**kwargs: Any) -> X.SampleRequest:
    base: dict[str, Any] = {
        "prompt": X.ModelInput.from_ints([1, 2, 3]),
        "sampling_params": X.SamplingParams(),
        "sampling_session_id": "s",
    }
    return X.SampleRequest(**{**base, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_samples": 0}, "num_samples"),
        ({"topk_prompt_logprobs": -1}, "topk_prompt_logprobs"),
        ({"topk_sample_logprobs": -1}, "topk_sample_logprobs"),
        ({"prompt_alt_tokens_k": -1}, "prompt_alt_tokens_k"),
        ({"prompt_logprobs_last_n": 0, "prompt_logprobs": True}, "prompt_logprobs_last_n"),
        ({"prompt_logprobs_last_n": 1}, "prompt_logprobs_last_n"),
        (
            {"target_prompt_logprobs": {"data": [1.0, 2.0], "dtype": "float32", "shape": [2, 1]}},
            "target_prompt_logprobs",
        ),
        ({"target_prompt_logprobs": {"data": [1, 2], "dtype": "int64"}}, "target_prompt_logprobs"),
        ({"sampling_session_id": None}, "sampling_session_id"),
        ({"sampling_params": {"top_k": 0}}, "sampling_params.top_k"),
    ],
)
def test_sample_request_rejects(kwargs: dict[str, Any], field: str) -> None:
    assert field in _error(lambda: _sample_request(**kwargs))


# ----------------------------------------------------------------------------- tokens
@pytest.mark.parametrize("tokens", [[-1], [1.0], [True], ["3"], [None], [2**70 * -1]])
def test_token_ids_must_be_non_negative_ints(tokens: list[Any]) -> None:
    assert "tokens" in _error(lambda: X.EncodedTextChunk(tokens=tokens))
    assert "chunks.0" in _error(
        lambda: X.ModelInput.model_validate({"chunks": [{"tokens": tokens}]})
    )


def test_token_ids_accept_numpy_integers() -> None:
    assert X.EncodedTextChunk(tokens=np.array([3, 4], dtype=np.int32)).tokens == [3, 4]
    assert X.EncodedTextChunk(tokens=[np.int64(5), 6]).tokens == [5, 6]
    assert "tokens" in _error(lambda: X.EncodedTextChunk(tokens=np.array([1.0])))
    assert "tokens" in _error(lambda: X.EncodedTextChunk(tokens=np.array([-1])))


def test_sampled_sequence_rejects_bad_tokens_and_lengths() -> None:
    assert "tokens" in _error(lambda: X.SampledSequence(stop_reason="stop", tokens=[-3]))
    message = _error(lambda: X.SampledSequence(stop_reason="stop", tokens=[1, 2], logprobs=[-1.0]))
    assert "logprobs" in message
    assert "stop_reason" in _error(lambda: X.SampledSequence(stop_reason="eos", tokens=[1]))


def test_chunk_rejections_name_fields() -> None:
    assert "data" in _error(lambda: X.ImageChunk(data="not base64!", format="png"))
    assert "format" in _error(lambda: X.ImageChunk(data=b"x", format="gif"))
    assert "expected_tokens" in _error(
        lambda: X.ImageChunk(data=b"x", format="png", expected_tokens=-1)
    )
    assert "chunks.0" in _error(
        lambda: X.ModelInput.model_validate({"chunks": [{"type": "video"}]})
    )


# ----------------------------------------------------------------------------- losses / datum
def test_unknown_loss_name() -> None:
    datum = _datum([1, 2], target_tokens=[2, 3])
    message = _error(lambda: X.ForwardBackwardInput(data=[datum], loss_fn="mse"))
    assert "loss_fn" in message
    assert "data" in _error(lambda: X.ForwardBackwardInput(data=[], loss_fn="cross_entropy"))


def test_target_tokens_length_must_match_model_input() -> None:
    message = _error(lambda: _datum([1, 2, 3], target_tokens=[2, 3]))
    assert "target_tokens" in message
    assert "model_input.length" in message


def test_weights_shape_must_match_target_tokens() -> None:
    message = _error(lambda: _datum([1, 2], target_tokens=[2, 3], weights=[1.0, 1.0, 1.0]))
    assert "weights" in message
    assert "target_tokens" in message
    two_d = np.ones((2, 3), dtype=np.int64)
    message = _error(lambda: _datum([1, 2], target_tokens=two_d, weights=np.ones((2, 2))))
    assert "weights" in message


@pytest.mark.parametrize("key", ["advantages", "logprobs", "sequence_ratio_mask"])
def test_per_token_inputs_must_match_length(key: str) -> None:
    message = _error(lambda: _datum([1, 2], target_tokens=[2, 3], **{key: [0.0, 0.0, 0.0]}))
    assert key in message


@pytest.mark.parametrize(
    ("inputs", "field"),
    [
        ({"target_tokens": [-1, 2]}, "target_tokens"),
        ({"target_tokens": np.array([0.5, 1.0])}, "target_tokens"),
        ({"target_tokens": [1, 2], "weights": [math.nan, 1.0]}, "weights"),
        ({"target_tokens": [1, 2], "advantages": [math.inf, 1.0]}, "advantages"),
        ({"target_tokens": [[1, 2], [3]]}, "target_tokens"),
        ({"target_tokens": ["a", "b"]}, "target_tokens"),
        ({"target_tokens": 5}, "target_tokens"),
    ],
)
def test_datum_input_rejections(inputs: dict[str, Any], field: str) -> None:
    assert field in _error(lambda: _datum([1, 2], **inputs))


def test_provenance_spans_come_in_pairs() -> None:
    span = X.PromptProvenanceSpan(sequence_id="q", length=2)
    message = _error(
        lambda: X.Datum(model_input=X.ModelInput.from_ints([1, 2]), model_input_spans=[span])
    )
    assert "loss_fn_input_spans" in message
    assert "length" in _error(lambda: X.SampledProvenanceSpan(sequence_id="q", length=-1))
    assert "sequence_id" in _error(lambda: X.SampledProvenanceSpan(sequence_id="", length=1))
    datum = _datum([1, 2], target_tokens=[2, 3])
    with pytest.raises(ValueError, match="model_input spans cover 1"):
        datum.with_provenance([X.PromptProvenanceSpan(sequence_id="q", length=1)], [span])


def test_forward_backward_output_metric_keys() -> None:
    for key in ["loss", "loss:sum:x"]:
        message = _error(
            lambda key=key: X.ForwardBackwardOutput(
                loss_fn_output_type="A", loss_fn_outputs=[], metrics={key: 1.0}
            )
        )
        assert "metrics" in message


# ----------------------------------------------------------------------------- tensors
@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"data": [1, 2, 3], "dtype": "int64", "shape": [2, 2]}, "shape"),
        ({"data": [1.5], "dtype": "int64"}, "data"),
        ({"data": [1], "dtype": "float64"}, "dtype"),
        ({"data": [1], "dtype": "int64", "shape": [-1]}, "shape"),
        (
            {"data": [1], "dtype": "int64", "shape": [1, 1], "sparse_crow_indices": [0, 1]},
            "sparse_col_indices",
        ),
        (
            {
                "data": [1],
                "dtype": "int64",
                "shape": [3],
                "sparse_crow_indices": [0, 1],
                "sparse_col_indices": [0],
            },
            "shape",
        ),
        (
            {
                "data": [1],
                "dtype": "int64",
                "shape": [2, 2],
                "sparse_crow_indices": [0, 1],
                "sparse_col_indices": [0],
            },
            "sparse_crow_indices",
        ),
        (
            {
                "data": [1],
                "dtype": "int64",
                "shape": [1, 2],
                "sparse_crow_indices": [0, 2],
                "sparse_col_indices": [0],
            },
            "sparse_crow_indices",
        ),
        (
            {
                "data": [1],
                "dtype": "int64",
                "shape": [1, 2],
                "sparse_crow_indices": [0, 1],
                "sparse_col_indices": [2],
            },
            "sparse_col_indices",
        ),
        (
            {
                "data": [1, 2],
                "dtype": "int64",
                "shape": [1, 2],
                "sparse_crow_indices": [0, 1],
                "sparse_col_indices": [0],
            },
            "data",
        ),
    ],
)
def test_tensor_data_rejects(fields: dict[str, Any], field: str) -> None:
    assert field in _error(lambda: X.TensorData(**fields))


def test_tensor_data_pad_value_must_be_int() -> None:
    tensor = X.TensorData(
        data=[1], dtype="int64", shape=[1, 2], sparse_crow_indices=[0, 1], sparse_col_indices=[0]
    )
    with pytest.raises(TypeError, match="pad_value"):
        tensor.to_numpy(pad_value=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="numpy dtype"):
        X.TensorData.from_numpy(np.array(["a"]))


# ----------------------------------------------------------------------------- optimizer
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"learning_rate": -1e-3}, "learning_rate"),
        ({"learning_rate": math.nan}, "learning_rate"),
        ({"beta1": 1.0}, "beta1"),
        ({"beta2": -0.1}, "beta2"),
        ({"beta2": math.inf}, "beta2"),
        ({"eps": -1e-8}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"grad_clip_norm": math.nan}, "grad_clip_norm"),
        ({"grad_clip_norm": math.inf}, "grad_clip_norm"),
    ],
)
def test_adam_params_rejects(kwargs: dict[str, Any], field: str) -> None:
    assert field in _error(lambda: X.AdamParams(**kwargs))


def test_optimizer_family_must_be_known() -> None:
    message = _error(
        lambda: X.OptimStepRequest.model_validate(
            {"model_id": "m", "optimizer_params": {"type": "lion", "learning_rate": 1.0}}
        )
    )
    assert "optimizer_params" in message
    assert "lion" in message
    assert "optimizer_config" in _error(
        lambda: X.CreateModelRequest.model_validate(
            {
                "session_id": "s",
                "model_seq_id": 0,
                "base_model": "b",
                "optimizer_config": {"type": "sgd"},
            }
        )
    )
    assert "learning_rate" in _error(lambda: X.DimuonParams(learning_rate=-1.0))
    assert "lora_config.rank" in _error(
        lambda: X.CreateModelRequest(
            session_id="s", model_seq_id=0, base_model="b", lora_config={"rank": 0}
        )
    )


# ----------------------------------------------------------------------------- weights / paths
@pytest.mark.parametrize("name", ["a/b", "", "..", "has space", "ünï"])
def test_save_names_are_checked(name: str) -> None:
    assert "path" in _error(lambda: X.SaveWeightsRequest(model_id="m", path=name))
    assert "path" in _error(lambda: X.SaveWeightsForSamplerRequest(model_id="m", path=name))
    assert "path" in _error(lambda: X.SaveWeightsExternalRequest(model_id="m", path=name))


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: X.LoadWeightsRequest(model_id="m", path="s1", optimizer=True), "path"),
        (lambda: X.CopyWeightsRequest(source_path="tinker://r/checkpoints/x"), "source_path"),
        (lambda: X.WeightsInfoRequest(tinker_path="tinker://r/weights"), "tinker_path"),
        (
            lambda: X.CreateSamplingSessionRequest(
                session_id="s", sampling_session_seq_id=0, model_path="/tmp/x"
            ),
            "model_path",
        ),
    ],
)
def test_tinker_paths_in_requests_are_checked(build: Callable[[], Any], field: str) -> None:
    assert field in _error(build)


def test_load_weights_addressing_modes() -> None:
    path = "tinker://r/weights/s"
    both = _error(
        lambda: X.LoadWeightsRequest(
            model_id="m", session_id="s", model_seq_id=0, path=path, optimizer=False
        )
    )
    assert "model_id" in both
    assert "session_id" in both
    assert "session_id" in _error(lambda: X.LoadWeightsRequest(path=path, optimizer=False))
    assert "model_seq_id" in _error(
        lambda: X.LoadWeightsRequest(session_id="s", path=path, optimizer=False)
    )
    assert X.LoadWeightsRequest(
        session_id="s", model_seq_id=1, path=path, optimizer=True
    ).creates_model


def test_sampler_save_needs_name_or_session() -> None:
    message = _error(lambda: X.SaveWeightsForSamplerRequest(model_id="m"))
    assert "path" in message
    assert "sampling_session_seq_id" in message
    assert "base_model" in _error(
        lambda: X.CreateSamplingSessionRequest(session_id="s", sampling_session_seq_id=0)
    )


def test_request_failed_category_is_lenient() -> None:
    assert (
        X.RequestFailedResponse(error="e", category="bogus").category
        is X.RequestErrorCategory.Unknown
    )
    assert X.RequestFailedResponse(error="e").category == "unknown"
    assert (
        X.RequestFailedResponse.model_validate({"error": "e", "category": "user"}).category
        is X.RequestErrorCategory.User
    )
    assert "request_id" in _error(lambda: X.UntypedAPIFuture.model_validate({"request_id": 5}))
