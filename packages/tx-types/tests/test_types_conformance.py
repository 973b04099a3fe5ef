"""Conformance of the JSON wire types with the official SDK (``tinker.types`` 0.38.0).

Every example is a function of a *types module*: the same constructor call builds an object
with the SDK and with tx_types (which is itself a check that class and field names match).
Both directions are exercised: SDK object → wire JSON → tx → wire JSON → SDK, and the reverse,
and the JSON that both libraries write for the same constructor call must be identical.
"""

from __future__ import annotations

import json
import types
from collections.abc import Callable
from typing import Any

import pytest

import tx_types

M = Any  # a types module: tinker.types (plus extras) or tx_types
TS = "2025-03-04T05:06:07Z"

_IMAGE = b"\x89PNG\r\n\x1a\nfake-image-bytes"
_DMEL = bytes([0, 2, 3, 5, 0xAA, 0xBB])  # TensorContainer header: dtype 0, ndim 2, shape (3, 5)


def _checkpoint(m: M, **extra: Any) -> Any:
    fields: dict[str, Any] = {
        "checkpoint_id": "weights/step-1",
        "checkpoint_type": "training",
        "time": TS,
        "tinker_path": "tinker://sess:train:0/weights/step-1",
    }
    return m.Checkpoint(**{**fields, **extra})


def _training_run(m: M, **extra: Any) -> Any:
    return m.TrainingRun(
        training_run_id="sess:train:0",
        base_model="Qwen/Qwen3-0.6B",
        model_owner="alice",
        is_lora=True,
        last_request_time=TS,
        **extra,
    )


def _event_fields() -> dict[str, Any]:
    return {"event_id": "e1", "event_session_index": 3, "severity": "INFO", "timestamp": TS}


EXAMPLES: list[tuple[str, Callable[[M], Any]]] = [
    # --- model input
    ("ModelInput-ints", lambda m: m.ModelInput.from_ints([1, 2, 3])),
    ("ModelInput-empty", lambda m: m.ModelInput.empty()),
    (
        "ModelInput-mixed",
        lambda m: m.ModelInput(
            chunks=[
                m.EncodedTextChunk(tokens=[5, 6]),
                m.ImageChunk(data=_IMAGE, format="png", expected_tokens=4),
                m.ImageAssetPointerChunk(format="jpeg", location="s3://b/k.jpg"),
                m.DmelChunk(dmel=_DMEL),
            ]
        ).append_int(7),
    ),
    ("ImageChunk-bare", lambda m: m.ImageChunk(data=_IMAGE, format="jpeg")),
    (
        "ImageAssetPointerChunk",
        lambda m: m.ImageAssetPointerChunk(format="png", location="/x.png", expected_tokens=9),
    ),
    # --- sampling
    ("SamplingParams-default", lambda m: m.SamplingParams()),
    (
        "SamplingParams-str",
        lambda m: m.SamplingParams(max_tokens=20, seed=7, stop="\n\n", temperature=0.0, top_k=50),
    ),
    ("SamplingParams-strs", lambda m: m.SamplingParams(stop=["</s>", "User:"], top_p=0.9)),
    ("SamplingParams-ints", lambda m: m.SamplingParams(stop=[151643, 0], max_tokens=1)),
    ("SamplingParams-empty-stop", lambda m: m.SamplingParams(stop=[], max_tokens=4)),
    (
        "SampleRequest-min",
        lambda m: m.SampleRequest(
            prompt=m.ModelInput.from_ints([1, 2]),
            sampling_params=m.SamplingParams(max_tokens=3),
            sampling_session_id="sess:sample:0",
            seq_id=0,
        ),
    ),
    (
        "SampleRequest-full",
        lambda m: m.SampleRequest(
            num_samples=4,
            prompt=m.ModelInput.from_ints([1, 2, 3]),
            sampling_params=m.SamplingParams(max_tokens=1, temperature=1.0, top_k=-1, top_p=1.0),
            sampling_session_id="sess:sample:1",
            seq_id=12,
            prompt_logprobs=True,
            topk_prompt_logprobs=5,
            topk_sample_logprobs=2,
            target_prompt_logprobs={"data": [4, -1, 7, 8], "dtype": "int64", "shape": [2, 2]},
            prompt_alt_tokens_k=3,
            prompt_logprobs_last_n=2,
            record_stability_info=True,
        ),
    ),
    (
        "SampleRequest-base-model",
        lambda m: m.SampleRequest(
            prompt=m.ModelInput.from_ints([1]),
            sampling_params=m.SamplingParams(),
            base_model="Qwen/Qwen3-0.6B",
            model_path="tinker://r/sampler_weights/s",
        ),
    ),
    (
        "CreateSamplingSessionRequest-path",
        lambda m: m.CreateSamplingSessionRequest(
            session_id="sess", sampling_session_seq_id=2, model_path="tinker://r/sampler_weights/a"
        ),
    ),
    (
        "CreateSamplingSessionRequest-base",
        lambda m: m.CreateSamplingSessionRequest(
            session_id="sess", sampling_session_seq_id=0, base_model="Qwen/Qwen3-0.6B"
        ),
    ),
    (
        "CreateSamplingSessionResponse",
        lambda m: m.CreateSamplingSessionResponse(sampling_session_id="sess:sample:0"),
    ),
    ("GetSamplerResponse-min", lambda m: m.GetSamplerResponse(sampler_id="s", base_model="b")),
    (
        "GetSamplerResponse-full",
        lambda m: m.GetSamplerResponse(
            sampler_id="s", base_model="b", model_path="tinker://r/sampler_weights/x"
        ),
    ),
    ("JoinSamplingSessionRequest", lambda m: m.JoinSamplingSessionRequest(sampling_session_id="s")),
    ("JoinSamplingSessionResponse", lambda m: m.JoinSamplingSessionResponse(client_counter=3)),
    # --- training
    ("LoraConfig-min", lambda m: m.LoraConfig(rank=32)),
    (
        "CreateModelRequest-min",
        lambda m: m.CreateModelRequest(session_id="sess", model_seq_id=0, base_model="Qwen/Q"),
    ),
    (
        "CreateModelRequest-full",
        lambda m: m.CreateModelRequest(
            session_id="sess",
            model_seq_id=3,
            base_model="Qwen/Qwen3-0.6B",
            user_metadata={"renderer": "qwen3", "n": 2},
            lora_config=m.LoraConfig(rank=8, seed=1, train_unembed=False, train_attn=False),
            optimizer_config=m.DimuonOptimizerConfig(),
        ),
    ),
    ("CreateModelResponse", lambda m: m.CreateModelResponse(model_id="sess:train:0")),
    ("GetInfoRequest", lambda m: m.GetInfoRequest(model_id="sess:train:0")),
    (
        "GetInfoResponse-min",
        lambda m: m.GetInfoResponse(model_id="sess:train:0", model_data=m.ModelData()),
    ),
    (
        "GetInfoResponse-full",
        lambda m: m.GetInfoResponse(
            type="get_info",
            model_id="sess:train:0",
            model_data=m.ModelData(arch="qwen3", model_name="/models/q/", tokenizer_id="/models/q"),
            is_lora=True,
            lora_rank=16,
            model_name="/models/q/",
        ),
    ),
    ("UnloadModelRequest", lambda m: m.UnloadModelRequest(model_id="m")),
    ("UnloadModelResponse", lambda m: m.UnloadModelResponse(model_id="m", type="unload_model")),
    ("AdamParams-default", lambda m: m.AdamParams()),
    (
        "AdamParams-custom",
        lambda m: m.AdamParams(
            learning_rate=3e-4, beta1=0.8, beta2=0.999, eps=1e-8, weight_decay=0.1, grad_clip_norm=1
        ),
    ),
    ("DimuonParams", lambda m: m.DimuonParams(learning_rate=0.02, beta1=0.5, grad_clip_norm=2.0)),
    (
        "OptimStepRequest-adam",
        lambda m: m.OptimStepRequest(
            adam_params=m.AdamParams(learning_rate=1e-3), model_id="sess:train:0", seq_id=5
        ),
    ),
    (
        "OptimStepRequest-dimuon",
        lambda m: m.OptimStepRequest(
            optim_params=m.DimuonParams(learning_rate=0.1), model_id="sess:train:0"
        ),
    ),
    ("OptimStepResponse-none", lambda m: m.OptimStepResponse()),
    ("OptimStepResponse", lambda m: m.OptimStepResponse(metrics={"grad_norm": 1.5, "lr": 1e-4})),
    ("AdamOptimizerConfig", lambda m: m.AdamOptimizerConfig()),
    ("DimuonOptimizerConfig", lambda m: m.DimuonOptimizerConfig()),
    # --- weights
    ("SaveWeightsRequest-min", lambda m: m.SaveWeightsRequest(model_id="m", path="s1", seq_id=2)),
    (
        "SaveWeightsRequest-full",
        lambda m: m.SaveWeightsRequest(
            model_id="m",
            path="step-10",
            seq_id=9,
            ttl_seconds=7200,
            overwrite=True,
            user_metadata={"k": "v"},
        ),
    ),
    ("SaveWeightsResponse", lambda m: m.SaveWeightsResponse(path="tinker://m/weights/s1")),
    (
        "SaveWeightsForSamplerRequest-named",
        lambda m: m.SaveWeightsForSamplerRequest(
            model_id="m", path="s", seq_id=3, ttl_seconds=3600, user_metadata={"a": "b"}
        ),
    ),
    (
        "SaveWeightsForSamplerRequest-unnamed",
        lambda m: m.SaveWeightsForSamplerRequest(
            model_id="m", sampling_session_seq_id=4, kind="inflight", seq_id=6
        ),
    ),
    (
        "SaveWeightsForSamplerResponse",
        lambda m: m.SaveWeightsForSamplerResponse(
            path="tinker://m/sampler_weights/s", type="save_weights_for_sampler"
        ),
    ),
    (
        "SaveWeightsForSamplerResponseInternal-path",
        lambda m: m.SaveWeightsForSamplerResponseInternal(path="tinker://m/sampler_weights/s"),
    ),
    (
        "SaveWeightsForSamplerResponseInternal-session",
        lambda m: m.SaveWeightsForSamplerResponseInternal(sampling_session_id="sess:sample:3"),
    ),
    (
        "SaveWeightsExternalRequest",
        lambda m: m.SaveWeightsExternalRequest(
            model_id="m", path="hf", seq_id=1, age_encryption_recipients=["age1xyz"]
        ),
    ),
    (
        "SaveWeightsExternalResponse",
        lambda m: m.SaveWeightsExternalResponse(path="tinker://m/external_weights/hf"),
    ),
    (
        "SaveWeightsExternalResponseInternal",
        lambda m: m.SaveWeightsExternalResponseInternal(
            path="tinker://m/external_weights/hf", size_bytes=1234
        ),
    ),
    (
        "LoadWeightsRequest-legacy",
        lambda m: m.LoadWeightsRequest(
            model_id="m", seq_id=1, path="tinker://r/weights/s1", optimizer=True
        ),
    ),
    (
        "LoadWeightsRequest-create",
        lambda m: m.LoadWeightsRequest(
            session_id="sess",
            model_seq_id=1,
            path="tinker://sess:train:0/weights/s1",
            optimizer=False,
            base_model="Qwen/Q",
            user_metadata={"x": 1},
            optimizer_config=m.AdamOptimizerConfig(),
            weights_access_token="tok",
        ),
    ),
    ("LoadWeightsResponse-empty", lambda m: m.LoadWeightsResponse()),
    (
        "LoadWeightsResponse",
        lambda m: m.LoadWeightsResponse(
            path="tinker://r/weights/s", model_id="m", type="load_weights"
        ),
    ),
    (
        "CopyWeightsRequest",
        lambda m: m.CopyWeightsRequest(
            source_path="tinker://r/weights/s", destination_project_id="p", ttl_seconds=3600
        ),
    ),
    ("CopyWeightsResponse", lambda m: m.CopyWeightsResponse(tinker_path="tinker://d/weights/c")),
    ("WeightsInfoResponse-min", lambda m: m.WeightsInfoResponse(base_model="b", is_lora=False)),
    (
        "WeightsInfoResponse-full",
        lambda m: m.WeightsInfoResponse(
            base_model="b",
            is_lora=True,
            lora_rank=8,
            train_unembed=True,
            train_mlp=False,
            train_attn=True,
            optimizer_config=m.DimuonOptimizerConfig(),
        ),
    ),
    (
        "ExternalWeightsUrlsResponse",
        lambda m: m.ExternalWeightsUrlsResponse(
            urls={"model.safetensors": "https://u"}, expires=TS
        ),
    ),
    # --- checkpoints and runs
    ("Checkpoint-min", lambda m: _checkpoint(m)),
    (
        "Checkpoint-full",
        lambda m: _checkpoint(
            m, size_bytes=10, public=True, user_metadata={"a": "b"}, expires_at=TS
        ),
    ),
    ("Cursor", lambda m: m.Cursor(offset=20, limit=10, total_count=35)),
    ("CheckpointsListResponse-min", lambda m: m.CheckpointsListResponse(checkpoints=[])),
    (
        "CheckpointsListResponse",
        lambda m: m.CheckpointsListResponse(
            checkpoints=[_checkpoint(m)], cursor=m.Cursor(offset=0, limit=100, total_count=1)
        ),
    ),
    ("TrainingRun-min", lambda m: _training_run(m)),
    (
        "TrainingRun-full",
        lambda m: _training_run(
            m,
            corrupted=True,
            lora_rank=32,
            last_checkpoint=_checkpoint(m),
            last_sampler_checkpoint=_checkpoint(m, checkpoint_type="sampler"),
            user_metadata={"renderer": "qwen3"},
        ),
    ),
    (
        "TrainingRunsResponse",
        lambda m: m.TrainingRunsResponse(
            training_runs=[_training_run(m)], cursor=m.Cursor(offset=0, limit=20, total_count=1)
        ),
    ),
    (
        "ParsedCheckpointTinkerPath",
        lambda m: m.ParsedCheckpointTinkerPath.from_tinker_path(
            "tinker://sess:train:0/sampler_weights/s-1"
        ),
    ),
    # --- sessions
    (
        "CreateSessionRequest-min",
        lambda m: m.CreateSessionRequest(tags=[], user_metadata={}, sdk_version="0.38.0"),
    ),
    (
        "CreateSessionRequest-full",
        lambda m: m.CreateSessionRequest(
            tags=["a", "b"],
            user_metadata={"k": [1, 2]},
            sdk_version="0.38.0",
            project_id="p",
            display_name="run",
        ),
    ),
    ("CreateSessionResponse-min", lambda m: m.CreateSessionResponse(session_id="sess")),
    (
        "CreateSessionResponse-full",
        lambda m: m.CreateSessionResponse(
            session_id="s", info_message="i", warning_message="w", error_message="e"
        ),
    ),
    ("SessionHeartbeatRequest", lambda m: m.SessionHeartbeatRequest(session_id="sess")),
    ("SessionHeartbeatResponse", lambda m: m.SessionHeartbeatResponse()),
    (
        "GetSessionResponse",
        lambda m: m.GetSessionResponse(
            training_run_ids=["s:train:0"],
            sampler_ids=[],
            user_metadata={"a": "b"},
            display_name="d",
        ),
    ),
    ("ListSessionsResponse", lambda m: m.ListSessionsResponse(sessions=["a", "b"])),
    (
        "SessionSearchRequest-full",
        lambda m: m.SessionSearchRequest(
            session_id="s",
            project_ids=["p"],
            user_metadata={"a": "b"},
            display_name="run",
            owner=m.UserSearchOwner(owner_urns=["urn:u"]),
            statuses=[
                m.ActiveSessionStatusQuery(),
                m.ClientFinishedSessionStatusQuery(reasons=["success", "errored"]),
            ],
            limit=10,
            cursor=m.SessionSearchCursor(last_created_at=TS, last_session_id="s0"),
        ),
    ),
    ("SessionSearchRequest-min", lambda m: m.SessionSearchRequest()),
    (
        "SessionSearchResponse",
        lambda m: m.SessionSearchResponse(
            sessions=[
                m.SessionSummary(
                    session_id="s",
                    created_at=TS,
                    owner="o",
                    project_id="p",
                    checkpoints_count=2,
                    status=m.SessionFailed(
                        category="user",
                        reason=m.SessionFailedRequestReason(request_id="r", request_type="Sample"),
                        message="bad",
                    ),
                ),
                m.SessionSummary(
                    session_id="t",
                    created_at=TS,
                    owner="o",
                    project_id="p",
                    checkpoints_count=0,
                    status=m.ClientSessionFinished(
                        reason=m.ClientSessionFinishInterrupted(), detail="ctrl-c"
                    ),
                    display_name="d",
                    user_metadata={"a": "b"},
                    checkpoint_storage_bytes=5,
                ),
            ],
            next_cursor=m.SessionSearchCursor(last_created_at=TS, last_session_id="t"),
        ),
    ),
    ("SessionCancelled", lambda m: m.SessionCancelled(detail="console")),
    (
        "SessionSearchRequest-owners-statuses",
        lambda m: m.SessionSearchRequest(
            owner=m.AccessibleSearchOwner(),
            statuses=[
                m.CancelledSessionStatusQuery(),
                m.FailedSessionStatusQuery(),
                m.ClientFinishedSessionStatusQuery(),
            ],
        ),
    ),
    ("SessionSearchRequest-own", lambda m: m.SessionSearchRequest(owner=m.OwnSearchOwner())),
    (
        "SessionFailed-training-run",
        lambda m: m.SessionFailed(
            category="internal",
            reason=m.SessionFailedTrainingRunReason(training_run_id="s:train:0"),
            message="oom",
        ),
    ),
    (
        "SessionFailed-sampling-session",
        lambda m: m.SessionFailed(
            category="user",
            reason=m.SessionFailedSamplingSessionReason(sampling_session_id="s:sample:0"),
            message="bad",
        ),
    ),
    (
        "ClientSessionFinished-success",
        lambda m: m.ClientSessionFinished(reason=m.ClientSessionFinishSuccess()),
    ),
    (
        "ClientSessionFinished-errored",
        lambda m: m.ClientSessionFinished(reason=m.ClientSessionFinishErrored(), detail="trace"),
    ),
    ("SessionActive", lambda m: m.SessionActive()),
    # --- futures and errors
    ("UntypedAPIFuture-min", lambda m: m.UntypedAPIFuture(request_id="r1")),
    (
        "UntypedAPIFuture-sample",
        lambda m: m.UntypedAPIFuture(
            request_id="r2", model_id="m", sample_sequence_ids=["q0", "q1"]
        ),
    ),
    (
        "FutureRetrieveRequest",
        lambda m: m.FutureRetrieveRequest(request_id="r", allow_metadata_only=True),
    ),
    (
        "TryAgainResponse",
        lambda m: m.TryAgainResponse(request_id="r", queue_state="paused_capacity"),
    ),
    ("RequestFailedResponse", lambda m: m.RequestFailedResponse(error="boom", category="user")),
    (
        "FuturesRetrieveRequest",
        lambda m: m.FuturesRetrieveRequest(
            target=m.SamplingSessionFuturesTarget(sampling_session_id="s", cloned_sampler_id=2),
            prev_cursor=4,
            timeout=0.0,
            retrieved_request_ids=["a"],
        ),
    ),
    (
        "FuturesRetrieveResponse",
        lambda m: m.FuturesRetrieveResponse(
            completions=[
                m.FutureFinished(request_id="a", response_payload_uncompressed_size=10),
                m.FutureFailed(request_id="b"),
            ],
            cursor=7,
        ),
    ),
    # --- telemetry
    (
        "TelemetrySendRequest",
        lambda m: m.TelemetrySendRequest(
            events=[
                m.SessionStartEvent(event="SESSION_START", **_event_fields()),
                m.SessionEndEvent(event="SESSION_END", duration="PT1.5S", **_event_fields()),
                m.UnhandledExceptionEvent(
                    event="UNHANDLED_EXCEPTION",
                    error_message="x",
                    error_type="ValueError",
                    traceback="tb",
                    **_event_fields(),
                ),
                m.GenericEvent(
                    event="GENERIC_EVENT", event_name="n", event_data={"k": 1}, **_event_fields()
                ),
            ],
            platform="linux",
            sdk_version="0.38.0",
            session_id="s",
            process_uuid="u",
        ),
    ),
    (
        "TelemetryBatch",
        lambda m: m.TelemetryBatch(
            events=[], platform="linux", sdk_version="0.38.0", session_id="s", process_uuid="u"
        ),
    ),
    ("TelemetryResponse", lambda m: m.TelemetryResponse(status="accepted")),
    # --- config and capabilities
    ("ClientConfigRequest", lambda m: m.ClientConfigRequest(sdk_version="0.38.0")),
    ("ClientConfigResponse-default", lambda m: m.ClientConfigResponse()),
    (
        "ClientConfigResponse-custom",
        lambda m: m.ClientConfigResponse(proto_compress_fwdbwd=True, fwdbwd_max_chunk_len=1),
    ),
    (
        "ClientDynamicConfigResponse",
        lambda m: m.ClientDynamicConfigResponse(refresh_interval_sec=60),
    ),
    (
        "GetServerCapabilitiesResponse",
        lambda m: m.GetServerCapabilitiesResponse(
            supported_models=[
                m.SupportedModel(),
                m.SupportedModel(
                    model_name="Qwen/Q", max_context_length=4096, trainable=True, sampleable=True
                ),
            ]
        ),
    ),
    ("HealthResponse", lambda m: m.HealthResponse(status="ok")),
    ("AuthTokenResponse", lambda m: m.AuthTokenResponse(jwt="eyJ.x.y")),
    ("WhoamiResponse", lambda m: m.WhoamiResponse(user_urn="u", org_urn="o", email="a@b")),
    # --- custom loss
    (
        "CreateCustomLossRequest",
        lambda m: m.CreateCustomLossRequest(
            session_id="s",
            custom_loss_seq_id=0,
            name="my_loss",
            inputs=[
                m.CustomLossInput(name="logprobs", rank=1),
                m.CustomLossInput(name="w", rank=0),
            ],
            graph=m.CustomLossGraph(
                nodes=[
                    m.CustomLossNode(op="placeholder", name="lp", target="logprobs"),
                    m.CustomLossNode(
                        op="call_function",
                        name="s",
                        target="torch.sum",
                        args=[{"ref": "lp"}],
                        kwargs={"dim": -1},
                    ),
                    m.CustomLossNode(op="output", name="out", target="output", args=[{"ref": "s"}]),
                ]
            ),
        ),
    ),
    ("CreateCustomLossResponse", lambda m: m.CreateCustomLossResponse(loss_id="loss-1")),
    # --- admin
    (
        "AuditLogResponse",
        lambda m: m.AuditLogResponse(
            entries=[
                m.AuditLogEntry(timestamp=TS, event="checkpoint_read", event_details={"a": 1}),
                m.AuditLogEntry(
                    timestamp=TS, event="x", model_id="m", tinker_path="t", purpose="p"
                ),
            ]
        ),
    ),
    (
        "GetBillingUsageRequest",
        lambda m: m.GetBillingUsageRequest(starting_on=TS, ending_before=TS),
    ),
    (
        "BillingUsageResponse",
        lambda m: m.BillingUsageResponse(
            data=[
                m.BillingUsageEvent(
                    bucket_start=TS, bucket_end=TS, event_info=m.TrainingBillingEvent(token_count=5)
                ),
                m.BillingUsageEvent(
                    bucket_start=TS,
                    bucket_end=TS,
                    base_model="b",
                    session_id="s",
                    estimated_cost_usd=0.5,
                    event_info=m.SamplingPrefillBillingEvent(cached=True, token_count=3),
                ),
                m.BillingUsageEvent(
                    bucket_start=TS,
                    bucket_end=TS,
                    event_info=m.SamplingSampleBillingEvent(token_count=1),
                ),
                m.BillingUsageEvent(
                    bucket_start=TS, bucket_end=TS, event_info=m.CheckpointBillingEvent(count=2)
                ),
                m.BillingUsageEvent(
                    bucket_start=TS,
                    bucket_end=TS,
                    event_info=m.StorageBillingEvent(free=True, gigabyte_hours=1.5),
                ),
            ],
            sessions={"s": m.BillingUsageSession(user_metadata={"a": "b"})},
            cost_data_through=TS,
        ),
    ),
    (
        "GetCurrentCheckpointStorageUsageRequest",
        lambda m: m.GetCurrentCheckpointStorageUsageRequest(project_id="p"),
    ),
    (
        "CurrentCheckpointStorageUsageResponse",
        lambda m: m.CurrentCheckpointStorageUsageResponse(
            effective_rate_usd_per_gigabyte_month=0.1,
            data=[
                m.CurrentCheckpointStorageUsageItem(
                    checkpoint_count=1, size_bytes=10, size_gigabytes=1e-8, user_email="a@b"
                )
            ],
        ),
    ),
]

_IDS = [name for name, _ in EXAMPLES]


def _json(obj: Any) -> dict[str, Any]:
    """What actually travels: the exclude_none JSON text, parsed back to Python values."""
    parsed: dict[str, Any] = json.loads(obj.model_dump_json(exclude_none=True))
    return parsed


@pytest.mark.parametrize(("name", "build"), EXAMPLES, ids=_IDS)
def test_same_constructor_same_json(
    name: str, build: Callable[[M], Any], sdk_types: Any, wire_dump: Any
) -> None:
    """Both libraries write identical JSON for the same constructor call."""
    sdk_obj, tx_obj = build(sdk_types), build(tx_types)
    assert type(tx_obj).__name__ == type(sdk_obj).__name__
    assert wire_dump(tx_obj) == wire_dump(sdk_obj)
    assert _json(tx_obj) == _json(sdk_obj)


@pytest.mark.parametrize(("name", "build"), EXAMPLES, ids=_IDS)
def test_sdk_to_tx_to_sdk(
    name: str, build: Callable[[M], Any], sdk_types: Any, wire_dump: Any
) -> None:
    sdk_obj = build(sdk_types)
    sdk_cls, tx_cls = type(sdk_obj), getattr(tx_types, type(sdk_obj).__name__)
    wire = wire_dump(sdk_obj)
    tx_obj = tx_cls.model_validate(wire)
    back = sdk_cls.model_validate(wire_dump(tx_obj))
    assert wire_dump(back) == wire
    # The same through JSON text (what a server actually receives).
    tx_from_text = tx_cls.model_validate_json(sdk_obj.model_dump_json(exclude_none=True))
    assert tx_from_text == tx_obj
    assert (
        wire_dump(sdk_cls.model_validate_json(tx_from_text.model_dump_json(exclude_none=True)))
        == wire
    )


@pytest.mark.parametrize(("name", "build"), EXAMPLES, ids=_IDS)
def test_tx_to_sdk_to_tx(
    name: str, build: Callable[[M], Any], sdk_types: Any, wire_dump: Any
) -> None:
    tx_obj = build(tx_types)
    tx_cls = type(tx_obj)
    sdk_cls = type(build(sdk_types))
    sdk_obj = sdk_cls.model_validate_json(tx_obj.model_dump_json(exclude_none=True))
    assert tx_cls.model_validate(wire_dump(sdk_obj)) == tx_obj
    assert tx_cls.model_validate_json(sdk_obj.model_dump_json(exclude_none=True)) == tx_obj


def test_examples_cover_every_tx_wire_model() -> None:
    """Every pydantic model exported by tx_types appears in an example (directly or nested)."""
    seen: set[str] = set()

    def walk(obj: Any) -> None:
        if isinstance(obj, tx_types.WireModel):
            seen.add(type(obj).__name__)
            for value in obj.__dict__.values():
                walk(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                walk(value)
        elif isinstance(obj, dict):
            for value in obj.values():
                walk(value)

    for _, build in EXAMPLES:
        walk(build(tx_types))
    models = {
        name
        for name in tx_types.__all__
        if isinstance(getattr(tx_types, name), type)
        and issubclass(getattr(tx_types, name), tx_types.WireModel)
        and getattr(tx_types, name) is not tx_types.WireModel
    }
    # Covered by test_types_conformance_arrays.py (SDK dataclasses there) or tx-only bodies
    # (no SDK counterpart), both tested elsewhere.
    elsewhere = {
        "TensorData", "Datum", "ForwardBackwardInput", "ForwardBackwardOutput",
        "ForwardBackwardRequest", "ForwardRequest", "SampleResponse", "SampledSequence",
        "PromptAltTokens", "PromptProvenanceSpan", "SampledProvenanceSpan",
        "FinishSessionRequest", "AssignSessionProjectRequest", "SessionTraceExportResponse",
        "WeightsInfoRequest", "SetCheckpointTtlRequest", "FutureMetadataResponse",
        "CancelFutureRequest",
    }  # fmt: skip
    assert models - seen - elsewhere == set()


# Names in the SDK's ``tinker.types`` namespace that are not wire types.
_NOT_WIRE_TYPES = {
    "annotations",  # the ``from __future__ import annotations`` feature flag, not a type
}


def test_every_sdk_wire_type_name_exists() -> None:
    tinker_types = pytest.importorskip("tinker.types")
    public = {
        name
        for name, value in vars(tinker_types).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    missing = sorted(name for name in public - _NOT_WIRE_TYPES if not hasattr(tx_types, name))
    assert missing == []
    assert set(tx_types.__all__) >= public - _NOT_WIRE_TYPES


def test_all_lists_only_existing_names() -> None:
    assert len(set(tx_types.__all__)) == len(tx_types.__all__)
    for name in tx_types.__all__:
        assert hasattr(tx_types, name), name
