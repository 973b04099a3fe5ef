"""Values that pass a plain type check but break the server later are rejected at validation.

Each case would otherwise reach a place that cannot hold it: a float beyond float32 becomes inf
in the engine, an int beyond 64 (or 32) bits overflows its database column, a NaN inside JSON
metadata is refused by PostgreSQL, a checkpoint name over the file-name limit fails in the
worker. Every rejection is a ValidationError whose text names the field.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError

import tx_types as X  # noqa: N812  (X mirrors the SDK-side alias T)

F32_MAX = 3.4028234663852886e38
NAME_LIMIT = 200  # bytes; tx_types.paths.MAX_CHECKPOINT_NAME_BYTES


def _error(build: Callable[[], Any]) -> str:
    with pytest.raises(ValidationError) as info:
        build()
    return str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"learning_rate": 1e308}, "learning_rate"),
        ({"learning_rate": 3.5e38}, "learning_rate"),
        ({"learning_rate": math.nan}, "learning_rate"),
        ({"learning_rate": -1e-4}, "learning_rate"),
        ({"eps": 1e39}, "eps"),
        ({"weight_decay": 1e300}, "weight_decay"),
        ({"grad_clip_norm": -1e300}, "grad_clip_norm"),
        ({"grad_clip_norm": math.inf}, "grad_clip_norm"),
    ],
)
def test_adam_params_must_fit_float32(kwargs: dict[str, Any], field: str) -> None:
    assert field in _error(lambda: X.AdamParams(**kwargs))


def test_adam_params_accept_the_float32_range() -> None:
    assert X.AdamParams(learning_rate=F32_MAX).learning_rate == F32_MAX
    assert X.AdamParams(learning_rate=0.0, grad_clip_norm=-F32_MAX).grad_clip_norm == -F32_MAX
    assert "learning_rate" in _error(lambda: X.DimuonParams(learning_rate=1e308))


def test_optim_step_body_names_the_nested_field() -> None:
    body = {"model_id": "m", "seq_id": 1, "adam_params": {"learning_rate": 1e308}}
    message = _error(lambda: X.OptimStepRequest.model_validate(body))
    assert "learning_rate" in message
    assert "float32" in message


def test_temperature_must_fit_float32() -> None:
    assert "temperature" in _error(lambda: X.SamplingParams(temperature=1e308))
    assert X.SamplingParams(temperature=1e38).temperature == 1e38


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda v: X.OptimStepRequest(model_id="m", seq_id=v, adam_params={}), "seq_id"),
        (lambda v: X.SaveWeightsRequest(model_id="m", seq_id=v), "seq_id"),
        (lambda v: X.SaveWeightsForSamplerRequest(model_id="m", path="p", seq_id=v), "seq_id"),
        (
            lambda v: X.LoadWeightsRequest(
                model_id="m", seq_id=v, path="tinker://r/weights/a", optimizer=False
            ),
            "seq_id",
        ),
    ],
)
def test_seq_ids_fit_64_bits(build: Callable[[int], Any], field: str) -> None:
    assert build(2**63 - 1) is not None
    assert field in _error(lambda: build(2**63))
    assert field in _error(lambda: build(10**30))


def test_seq_ids_of_requests_validated_from_json_fit_64_bits() -> None:
    raw = '{"prompt": {"chunks": []}, "sampling_params": {}, "seq_id": 9223372036854775808}'
    assert "seq_id" in _error(lambda: X.SampleRequest.model_validate_json(raw))


def test_model_and_sampler_numbers_fit_32_bits() -> None:
    ok = X.CreateModelRequest(session_id="s", model_seq_id=2**31 - 1, base_model="b")
    assert ok.model_seq_id == 2**31 - 1
    assert "model_seq_id" in _error(
        lambda: X.CreateModelRequest(session_id="s", model_seq_id=2**31, base_model="b")
    )
    assert "sampling_session_seq_id" in _error(
        lambda: X.CreateSamplingSessionRequest(
            session_id="s", sampling_session_seq_id=2**31, base_model="b"
        )
    )
    assert "model_seq_id" in _error(
        lambda: X.LoadWeightsRequest(
            session_id="s", model_seq_id=2**40, path="tinker://r/weights/a", optimizer=False
        )
    )


def test_session_metadata_must_be_json_compliant() -> None:
    body = {"sdk_version": "0.38.0", "user_metadata": {"a": [1, {"b": math.nan}]}}
    message = _error(lambda: X.CreateSessionRequest.model_validate(body))
    assert "user_metadata['a'][1]['b']" in message
    ok = {"sdk_version": "0.38.0", "user_metadata": {"a": [1.5, {"b": "x"}], "c": None}}
    assert X.CreateSessionRequest.model_validate(ok).user_metadata["a"] == [1.5, {"b": "x"}]


def test_loss_fn_config_numbers_must_be_finite() -> None:
    datum = X.Datum(model_input=X.ModelInput.from_ints([1, 2]), loss_fn_inputs={})
    message = _error(
        lambda: X.ForwardBackwardInput(
            data=[datum], loss_fn="cross_entropy", loss_fn_config={"beta": math.nan}
        )
    )
    assert "loss_fn_config" in message


def test_checkpoint_names_are_bounded_in_bytes() -> None:
    from tx_types.paths import MAX_CHECKPOINT_NAME_BYTES

    assert MAX_CHECKPOINT_NAME_BYTES == NAME_LIMIT < 255  # one directory name, with room to spare
    longest = "b" * NAME_LIMIT
    assert X.validate_checkpoint_name(longest) == longest
    for name in ["b" * (NAME_LIMIT + 1), "b" * 256, "b" * 100_000]:
        with pytest.raises(X.InvalidTinkerPathError, match="bytes long") as info:
            X.validate_checkpoint_name(name)
        assert len(str(info.value)) < 200  # a huge name is not quoted back whole
    too_long = "b" * 256
    assert "path" in _error(lambda: X.SaveWeightsRequest(model_id="m", path=too_long))
    assert "path" in _error(lambda: X.SaveWeightsForSamplerRequest(model_id="m", path=too_long))
    assert "path" in _error(lambda: X.SaveWeightsExternalRequest(model_id="m", path=too_long))
    with pytest.raises(X.InvalidTinkerPathError, match="invalid tinker path"):
        X.ParsedCheckpointTinkerPath.from_tinker_path(f"tinker://r:train:0/weights/{too_long}")
    with pytest.raises(X.InvalidTinkerPathError, match="bytes long"):
        X.make_tinker_path("r:train:0", "sampler", too_long)
