"""Limits of what a server accepts: finished sessions, request sizes, sample counts, failed runs.

Against a live API + worker thread (the tx-engine kit's tiny Qwen3 served as ``Qwen/Qwen3-8B``)
driven by the unmodified tinker SDK where the behaviour shows through it, and by plain HTTP
where the SDK cannot send the request (it refuses work on a closed ``ServiceClient`` itself,
and never sends more datums per request than ``client/config`` advertises). No mocks: the
run-removal test plays the worker through the real :class:`~tx_server.work_queue.WorkQueue`.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import tinker
from tinker import types

from tx_server.settings import ClientFlags, EngineSettings
from tx_server.testing import API_KEY, RunningServer, run_hub_model_server
from tx_types import Datum as WireDatum
from tx_types import ForwardBackwardInput
from tx_types.proto import encode_forward_backward_request

BASE = "Qwen/Qwen3-8B"
TOKENS = [5, 17, 42, 9, 101, 77, 3, 250, 64, 12, 33, 8]
HEADERS = {"X-API-Key": API_KEY}
PROTO = {**HEADERS, "Content-Type": "application/x-protobuf"}
CHUNK_LEN = 4
MAX_TOKENS = 200
MAX_BODY = 256 * 1024


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    engine = EngineSettings(
        max_lora_rank=16, max_lora_adapters=8, max_seq_len=64, sample_tokens_per_batch=512
    )
    with run_hub_model_server(
        tmp_path_factory.mktemp("limits"),
        base_models=[BASE],
        engine=engine,
        client=ClientFlags(fwdbwd_max_chunk_len=CHUNK_LEN),
        max_fwdbwd_tokens=MAX_TOKENS,
        max_fwdbwd_body_bytes=MAX_BODY,
    ) as server:
        yield server


@pytest.fixture
def http(live: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{live.url}/api/v1", headers=HEADERS, timeout=60) as client:
        yield client


def _datum(tokens: list[int] = TOKENS) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": types.TensorData(data=tokens[1:], dtype="int64")},
    )


def _wire_datum(tokens: list[int] = TOKENS, **extra: list[float]) -> dict[str, Any]:
    inputs: dict[str, Any] = {"target_tokens": {"data": tokens[1:], "dtype": "int64"}}
    inputs |= {name: {"data": values, "dtype": "float32"} for name, values in extra.items()}
    return {
        "model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens[:-1]}]},
        "loss_fn_inputs": inputs,
    }


def _proto(model_id: str, seq_id: int, data: list[dict[str, Any]], compress: bool = False) -> bytes:
    batch = ForwardBackwardInput(
        data=[WireDatum.model_validate(d) for d in data], loss_fn="cross_entropy"
    )
    return encode_forward_backward_request(model_id, seq_id, batch, False, compress=compress)


def _retrieve(http: httpx.Client, request_id: str) -> httpx.Response:
    for _ in range(30):
        response = http.post("/retrieve_future", json={"request_id": request_id})
        if response.status_code != 408:
            return response
    raise AssertionError(f"request {request_id} never finished")


def _training_client(sc: tinker.ServiceClient) -> tinker.TrainingClient:
    tc: tinker.TrainingClient = sc.create_lora_training_client(BASE, rank=4, seed=1).result(
        timeout=120
    )
    return tc


# --- a finished session takes no new work (spec §4.1, §10 case 15) -------------------------


def test_work_on_a_finished_session_is_refused_and_earlier_results_stay(
    live: RunningServer,
    http: httpx.Client,
    sdk_service: Callable[[RunningServer], tinker.ServiceClient],
) -> None:
    sc = sdk_service(live)
    tc = _training_client(sc)
    model_id = tc.model_id
    sampler = tc.save_weights_and_get_sampling_client().result(timeout=120)
    handle = pickle.dumps(sampler)  # a clone reuses the session, as in another process
    before = http.post(
        "/forward_backward", content=_proto(model_id, 100, [_wire_datum()]), headers=PROTO
    )
    request_id = before.json()["request_id"]
    assert _retrieve(http, request_id).headers["content-type"] == "application/x-protobuf"

    session_id = sc.holder.get_session_id()
    sc.close("success").result(timeout=30)

    refused = [
        http.post(
            "/forward_backward", content=_proto(model_id, 101, [_wire_datum()]), headers=PROTO
        ),
        http.post(
            "/optim_step",
            json={"model_id": model_id, "seq_id": 102, "adam_params": {"learning_rate": 1e-3}},
        ),
        http.post("/save_weights", json={"model_id": model_id, "seq_id": 103, "path": "late"}),
        http.post(
            "/save_weights_for_sampler", json={"model_id": model_id, "seq_id": 104, "path": "late"}
        ),
    ]
    for response in refused:
        assert response.status_code == 410, response.text
        assert int(response.headers["content-length"]) == len(response.content)
        assert "is finished" in response.json()["detail"]
    # Accepted before the finish: a re-POST gets its id back, and the outcome stays retrievable.
    again = http.post(
        "/forward_backward", content=_proto(model_id, 100, [_wire_datum()]), headers=PROTO
    )
    assert again.json()["request_id"] == request_id
    assert _retrieve(http, request_id).headers["content-type"] == "application/x-protobuf"
    assert http.post("/get_info", json={"model_id": model_id}).status_code == 200

    clone = pickle.loads(handle)
    started = time.monotonic()
    with pytest.raises(tinker.APIStatusError) as info:
        clone.sample(
            types.ModelInput.from_ints(TOKENS[:3]), 1, types.SamplingParams(max_tokens=2)
        ).result(timeout=60)
    assert info.value.status_code == 410
    assert "is finished" in str(info.value)
    assert time.monotonic() - started < 10  # raised at once: neither retry layer retries 410
    finish = live.recorder.calls.index(f"POST /api/v1/sessions/{session_id}/finish")
    assert live.recorder.calls[finish:].count("POST /api/v1/asample") == 1


# --- one sample_sequence_id per sample; num_samples bounded ---------------------------------


def test_num_samples_over_the_limit_fails_as_a_user_error(
    live: RunningServer, sdk_service: Callable[[RunningServer], tinker.ServiceClient]
) -> None:
    sc = sdk_service(live)
    sampler = sc.create_sampling_client(base_model=BASE).result(timeout=120)
    prompt = types.ModelInput.from_ints(TOKENS[:3])
    params = types.SamplingParams(max_tokens=1)
    with pytest.raises(tinker.RequestFailedError) as info:  # the default limit is 1024
        sampler.sample(prompt, 1025, params).result(timeout=120)
    assert info.value.category == "user"
    assert "num_samples 1025" in str(info.value)
    assert "max_num_samples" in str(info.value)
    out = sampler.sample(prompt, 3, params).result(timeout=120)
    assert len({s.sequence_id for s in out.sequences}) == 3


# --- request size limits (spec §4.2 chunking) -----------------------------------------------


def test_sdk_chunks_stay_within_the_advertised_limits(
    live: RunningServer, sdk_service: Callable[[RunningServer], tinker.ServiceClient]
) -> None:
    tc = _training_client(sdk_service(live))
    out = tc.forward_backward([_datum()] * 10, "cross_entropy").result(timeout=120)
    assert len(out.loss_fn_outputs) == 10
    assert live.recorder.calls.count("POST /api/v1/forward_backward") >= 3


def test_oversized_forward_backward_fails_on_arrival_naming_the_limit(
    live: RunningServer,
    http: httpx.Client,
    sdk_service: Callable[[RunningServer], tinker.ServiceClient],
) -> None:
    model_id = _training_client(sdk_service(live)).model_id
    long_tokens = list(range(1, 61))  # 59 model-input tokens per datum, within max_seq_len
    padded = [_wire_datum(pad=[0.0] * (MAX_BODY // 4))]  # a body over max_fwdbwd_body_bytes
    cases = [
        (_proto(model_id, 10, [_wire_datum()] * (CHUNK_LEN + 1)), {}, "fwdbwd_max_chunk_len"),
        (_proto(model_id, 11, [_wire_datum(long_tokens)] * 4), {}, "max_fwdbwd_tokens"),
        (_proto(model_id, 12, padded), {}, "max_fwdbwd_body_bytes"),
        (_proto(model_id, 13, padded, compress=True), {"Content-Encoding": "zstd"}, "zstd body"),
    ]
    for body, headers, named in cases:
        response = http.post("/forward_backward", content=body, headers={**PROTO, **headers})
        assert response.status_code == 200, response.text
        failed = _retrieve(http, response.json()["request_id"]).json()
        assert failed["category"] == "user", failed
        assert "too large" in failed["error"], failed["error"]
        assert named in failed["error"], failed["error"]
    declared = http.post(
        "/forward_backward",
        content=iter([b"\0" * MAX_BODY, b"\0"]),  # streamed: no Content-Length to go by
        headers=PROTO,
    )
    assert "max_fwdbwd_body_bytes" in _retrieve(http, declared.json()["request_id"]).json()["error"]


# --- a creation that fails leaves no run ----------------------------------------------------


def _create_model(http: httpx.Client, session_id: str, seq: int, **lora: Any) -> str:
    body = {
        "session_id": session_id,
        "model_seq_id": seq,
        "base_model": "Qwen/Qwen3-0.6B",  # served by the API-only ``server`` fixture
        "lora_config": {"rank": 4, **lora},
    }
    response = http.post("/create_model", json=body)
    assert response.status_code == 200, response.text
    request_id: str = response.json()["request_id"]
    return request_id


def _run_ids(http: httpx.Client) -> set[str]:
    runs = http.get("/training_runs", params={"limit": 100}).json()["training_runs"]
    return {r["training_run_id"] for r in runs}


def test_a_failed_creation_leaves_no_run(server: RunningServer) -> None:
    with httpx.Client(base_url=f"{server.url}/api/v1", headers=HEADERS, timeout=60) as http:
        session_id = http.post("/create_session", json={"sdk_version": "0.38.0"}).json()[
            "session_id"
        ]
        bad = _create_model(
            http, session_id, 0, train_attn=False, train_mlp=False, train_unembed=False
        )
        failed = http.post("/retrieve_future", json={"request_id": bad}).json()
        assert failed["category"] == "user"
        assert "train_attn" in failed["error"]
        assert http.post("/get_info", json={"model_id": f"{session_id}:train:0"}).status_code == 404

        # One the worker fails (no worker runs here: the test claims and fails it as one would).
        request_id = _create_model(http, session_id, 1)
        model_id = f"{session_id}:train:1"
        assert http.post("/get_info", json={"model_id": model_id}).status_code == 200
        queue = server.queue()
        try:
            (claimed,) = queue.claim_pending()
            assert claimed.request_id == request_id
            queue.fail(request_id, "the engine refused this adapter", "user")
        finally:
            queue.db.dispose()
        failed = http.post("/retrieve_future", json={"request_id": request_id}).json()
        assert failed == {"error": "the engine refused this adapter", "category": "user"}
        assert http.post("/get_info", json={"model_id": model_id}).status_code == 404
        assert _run_ids(http) == set()
        # A transport retry of the failed create gets its failure back, not a revived run.
        assert _create_model(http, session_id, 1) == request_id
        assert http.post("/get_info", json={"model_id": model_id}).status_code == 404
        assert _run_ids(http) == set()


# --- Messages that name the real problem ----------------------------------------------------


def test_messages_name_custom_losses_and_model_seq_id(
    live: RunningServer,
    http: httpx.Client,
    sdk_service: Callable[[RunningServer], tinker.ServiceClient],
) -> None:
    sc = sdk_service(live)
    tc = _training_client(sc)
    with pytest.raises(tinker.RequestFailedError) as info:
        tc.forward_backward([_datum()], "custom", {"loss_id": "abc"}).result(timeout=120)
    assert info.value.category == "user"
    assert "forward_backward_custom" in str(info.value)
    assert "client-side" in str(info.value)

    path = tc.save_state("s1").result(timeout=120).path
    reuse = {
        "session_id": sc.holder.get_session_id(),
        "model_seq_id": 0,  # already used by create_lora_training_client
        "path": path,
        "optimizer": False,
    }
    response = http.post("/load_weights", json=reuse)
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert "model_seq_id 0" in detail, detail
    assert "'create_model'" in detail
    assert "None" not in detail
