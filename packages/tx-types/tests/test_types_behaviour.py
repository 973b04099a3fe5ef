"""SDK-like behaviour of the types: helpers, defaults, serialisation rules, optional torch."""

from __future__ import annotations

import base64
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pytest
from pydantic import ValidationError

import tx_types as X  # noqa: N812  (X mirrors the SDK-side alias T)

HAVE_TORCH = importlib.util.find_spec("torch") is not None
_DMEL = bytes([254, 1, 2, 4, 7, 9, 9])  # constant marker, dtype 1, ndim 2, shape (4, 7)


def _wire(obj: Any) -> dict[str, Any]:
    dumped: dict[str, Any] = obj.model_dump(mode="json", exclude_none=True)
    return dumped


def test_model_input_helpers_with_non_text_chunks() -> None:
    image = X.ImageChunk(data=b"\x00\x01", format="png", expected_tokens=5)
    mi = X.ModelInput.from_ints([1, 2]).append(image).append(X.DmelChunk(dmel=_DMEL))
    assert mi.length == 2 + 5 + 4
    with pytest.raises(ValueError, match="to_ints only supported"):
        mi.to_ints()
    with pytest.raises(ValueError, match="expected_tokens"):
        _ = X.ModelInput(chunks=[X.ImageChunk(data=b"", format="jpeg")]).length
    with pytest.raises(ValueError, match="expected_tokens"):
        _ = X.ImageAssetPointerChunk(format="png", location="x").length


def test_tensor_container_shape() -> None:
    assert X.tensor_container_shape(bytes([3, 3, 2, 0x81, 0x01, 5])) == (2, 129, 5)
    for bad, problem in [(b"", "empty"), (bytes([9, 1]), "dtype"), (bytes([0, 2, 3]), "Truncated")]:
        with pytest.raises(ValueError, match=problem):
            X.tensor_container_shape(bad)


def test_bytes_are_base64_in_json_and_raw_in_python() -> None:
    chunk = X.ImageChunk(data=b"\xff\x00png", format="png")
    wire = _wire(chunk)
    assert wire == {
        "data": base64.b64encode(b"\xff\x00png").decode(),
        "format": "png",
        "type": "image",
    }
    assert X.ImageChunk.model_validate(wire).data == b"\xff\x00png"
    assert X.DmelChunk.model_validate_json(X.DmelChunk(dmel=_DMEL).model_dump_json()).dmel == _DMEL


def test_chunk_type_is_inferred_when_missing() -> None:
    mi = X.ModelInput.model_validate(
        {"chunks": [{"tokens": [1]}, {"location": "u", "format": "png"}, {"dmel": ""}]}
    )
    assert [c.type for c in mi.chunks] == ["encoded_text", "image_asset_pointer", "dmel"]


def test_literal_type_fields_are_always_serialised() -> None:
    assert _wire(X.GetInfoRequest(model_id="m"))["type"] == "get_info"
    assert _wire(X.SessionHeartbeatRequest(session_id="s"))["type"] == "session_heartbeat"
    wire = _wire(X.SaveWeightsRequest(model_id="m", path="a"))
    assert wire == {"model_id": "m", "path": "a", "overwrite": False, "type": "save_weights"}
    assert (
        _wire(X.SaveWeightsForSamplerRequest(model_id="m", sampling_session_seq_id=1))["kind"]
        == "snapshot"
    )


def test_requests_ignore_unknown_fields() -> None:
    body = {
        "session_id": "s",
        "model_seq_id": 0,
        "base_model": "b",
        "type": "create_model",
        "some_future_field": {"x": 1},
    }
    req = X.CreateModelRequest.model_validate(body)
    assert "some_future_field" not in _wire(req)
    assert _wire(req)["optimizer_config"] == {"type": "adamw"}


def test_models_are_frozen() -> None:
    params = X.SamplingParams()
    with pytest.raises(ValidationError):
        params.temperature = 2.0  # type: ignore[misc]
    assert params.model_copy(update={"temperature": 0.5}).temperature == 0.5


def test_client_config_defaults_match_spec() -> None:
    assert X.ClientConfigResponse().model_dump() == {
        "pjwt_auth_enabled": False,
        "credential_default_source": "api_key",
        "sample_dispatch_bytes_semaphore_size": 10485760,
        "inflight_response_bytes_semaphore_size": 52428800,
        "parallel_fwdbwd_chunks": True,
        "proto_compress_fwdbwd": False,
        "fwdbwd_max_chunk_len": 1024,
        "fwdbwd_max_chunk_bytes_count": 5000000,
        "fwdbwd_dispatch_bytes_semaphore_size": 50000000,
        "billing_exception_max_pause_duration_sec": 3600,
        "sample_no_retries": False,
        "sample_enable_stuck_detection": True,
        "sample_max_concurrent_requests": 2000,
        "use_pyqwest_transport": True,
        "sample_use_retrieve_futures": False,
        "custom_loss_server_side": False,
        "sample_join_sampling_session": False,
    }
    assert X.ClientConfigResponse.model_validate({}) == X.ClientConfigResponse()
    assert X.ClientDynamicConfigResponse().model_dump() == {
        "refresh_interval_sec": 300,
        "sample_cancel_enabled": False,
        "sample_cancel_max_batch_size": 64,
    }


def test_adam_defaults_match_spec() -> None:
    assert X.AdamParams().model_dump() == {
        "learning_rate": 1e-4,
        "beta1": 0.9,
        "beta2": 0.95,
        "eps": 1e-12,
        "weight_decay": 0.0,
        "grad_clip_norm": 0.0,
    }


@pytest.mark.parametrize("key", ["optim_params", "adam_params"])
def test_optim_step_accepts_aliases(key: str) -> None:
    req = X.OptimStepRequest.model_validate({"model_id": "m", key: {"learning_rate": 0.5}})
    assert isinstance(req.optim_params, X.AdamParams)
    assert req.optim_params.learning_rate == 0.5
    assert "adam_params" in _wire(req)
    assert "optim_params" not in _wire(req)


def test_loss_names_match_sdk() -> None:
    sdk = pytest.importorskip("tinker.types")
    assert set(X.LOSS_FN_TYPES) == set(get_args(sdk.LossFnType))
    assert len(X.LOSS_FN_TYPES) == 8


def test_create_session_null_metadata_becomes_empty() -> None:
    req = X.CreateSessionRequest.model_validate({"sdk_version": "0.38.0", "user_metadata": None})
    assert _wire(req) == {
        "tags": [],
        "user_metadata": {},
        "sdk_version": "0.38.0",
        "type": "create_session",
    }


def test_finish_session_body() -> None:
    body = {"reason": {"type": "interrupted"}, "detail": None}
    req = X.FinishSessionRequest.model_validate(body)
    assert isinstance(req.reason, X.ClientSessionFinishInterrupted)
    assert _wire(req) == {"reason": {"type": "interrupted"}}
    with pytest.raises(ValidationError, match="reason"):
        X.FinishSessionRequest.model_validate({"reason": {"type": "crashed"}})


def test_poll_answers() -> None:
    assert _wire(X.FutureMetadataResponse(response_payload_size=10)) == {
        "status": "complete_metadata",
        "response_payload_size": 10,
    }
    assert _wire(X.TryAgainResponse(request_id="r", queue_state="active"))["type"] == "try_again"
    assert _wire(X.RequestFailedResponse(error="bad", category=X.RequestErrorCategory.User)) == {
        "error": "bad",
        "category": "user",
    }


def test_datum_keeps_numpy_dtypes_like_the_sdk() -> None:
    datum = X.Datum(
        model_input=X.ModelInput.from_ints([1, 2]),
        loss_fn_inputs={"target_tokens": np.array([3, 4], dtype=np.int32), "custom": [0.5, 1.5]},
    )
    assert datum.loss_fn_inputs["target_tokens"].dtype == "int64"
    assert datum.loss_fn_inputs["custom"].dtype == "float32"
    assert datum.loss_fn_inputs["custom"].shape == [2]


def test_datum_length_check_skipped_without_expected_tokens() -> None:
    mi = X.ModelInput(
        chunks=[X.ImageChunk(data=b"x", format="png"), X.EncodedTextChunk(tokens=[1])]
    )
    datum = X.Datum(model_input=mi, loss_fn_inputs={"target_tokens": [1, 2, 3]})
    assert datum.loss_fn_inputs["target_tokens"].shape == [3]


def test_sparse_loss_inputs_are_accepted() -> None:
    targets = X.TensorData.from_numpy_sparse(np.array([[5, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]))
    weights = X.TensorData.from_numpy_sparse(
        np.array([[1.0, 0, 0, 0], [0] * 4, [0] * 4], dtype=np.float32)
    )
    assert targets.is_sparse
    assert weights.is_sparse
    datum = X.Datum(
        model_input=X.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={"target_tokens": targets, "weights": weights},
    )
    assert datum.loss_fn_inputs["target_tokens"].to_numpy().shape == (3, 4)


@pytest.mark.skipif(HAVE_TORCH, reason="checks the behaviour without torch")
def test_torch_conversion_needs_torch() -> None:
    with pytest.raises(ImportError, match="PyTorch is not installed"):
        X.TensorData(data=[1], dtype="int64").to_torch()
    with pytest.raises(ImportError):
        X.TensorData.from_torch(object())


@pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed")
def test_torch_round_trip_and_datum_conversion() -> None:
    import torch

    tensor = torch.tensor([[1.5, 0.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.bfloat16)
    td = X.TensorData.from_torch(tensor)
    assert td.dtype == "float32"
    assert td.shape == [3, 2]
    assert torch.equal(td.to_torch(), tensor.float())
    targets = torch.zeros((4, 4), dtype=torch.int64)
    targets[1, 2] = 7
    weights = (targets > 0).float()
    datum = X.Datum(
        model_input=X.ModelInput.from_ints([1, 2, 3, 4]),
        loss_fn_inputs={"target_tokens": targets, "weights": weights, "advantages": torch.ones(4)},
    )
    ours = datum.loss_fn_inputs["target_tokens"]
    assert ours.is_sparse  # 2-D targets/weights become CSR when smaller, like the SDK
    assert datum.loss_fn_inputs["weights"].is_sparse
    assert not datum.loss_fn_inputs["advantages"].is_sparse
    assert torch.equal(ours.to_torch(), targets)
    # bf16 is widened to float32 (the SDK 0.38.0 itself fails on sparse bf16 weights).
    bf16 = X.Datum(
        model_input=X.ModelInput.from_ints([1, 2, 3, 4]),
        loss_fn_inputs={"target_tokens": targets, "weights": weights.to(torch.bfloat16)},
    )
    assert bf16.loss_fn_inputs["weights"] == datum.loss_fn_inputs["weights"]
    sdk = pytest.importorskip("tinker.types")
    ref = sdk.Datum(
        model_input=sdk.ModelInput.from_ints([1, 2, 3, 4]),
        loss_fn_inputs={"target_tokens": targets, "weights": weights},
    )
    for key in ("target_tokens", "weights"):
        theirs, mine = ref.loss_fn_inputs[key], datum.loss_fn_inputs[key]
        assert (mine.dtype, mine.shape, mine.data) == (theirs.dtype, theirs.shape, theirs.data)
        assert mine.sparse_crow_indices == theirs.sparse_crow_indices
        assert mine.sparse_col_indices == theirs.sparse_col_indices
        assert torch.equal(mine.to_torch(pad_value=-1), theirs.to_torch(pad_value=-1))


def test_import_pulls_no_heavy_dependencies() -> None:
    code = (
        "import sys, tx_types\n"
        "bad = [m for m in ('torch', 'jax', 'fastapi', 'httpx', 'tinker') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_readme_example_runs() -> None:
    readme = Path(__file__).resolve().parents[1] / "README.md"
    snippets = re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S)
    assert snippets
    for snippet in snippets:
        exec(compile(snippet, str(readme), "exec"), {})
