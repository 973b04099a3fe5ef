"""Spec §10 conformance cases not covered elsewhere, driven by the unmodified tinker SDK 0.38.0.

Everything is real: uvicorn on 127.0.0.1, SQLite, the worker thread and its engine serving the
kit's tiny Qwen3 under the hub name ``Qwen/Qwen3-8B``. Cases: idempotent re-submission of a raw
protobuf body (§10.6), an internal fault surfacing as category ``server`` while the server keeps
serving (§10.8), the weights-only restore resetting optimizer moments (§10.9), REST pagination and
lookup by path (§10.14), the context-manager session lifecycle (§10.15) and, on a server that
asks for one-datum chunks, chunk order and the optimizer barrier (§10.5).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

import tx_types
from tx_server.settings import ClientFlags, EngineSettings
from tx_server.testing import API_KEY, RunningServer, run_hub_model_server
from tx_types.proto import encode_forward_backward_request

BASE = "Qwen/Qwen3-8B"
TOKENS = [5, 17, 42, 9, 101, 77, 3, 250, 64, 12, 33, 8]
TIMEOUT = 120


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    engine = EngineSettings(max_lora_rank=8, max_lora_adapters=12, max_seq_len=64)
    root = tmp_path_factory.mktemp("conformance")
    with run_hub_model_server(root, base_models=[BASE], engine=engine) as server:
        yield server


def _datum() -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=TOKENS[1:], dtype="int64"),
            "weights": types.TensorData(data=[1.0] * (len(TOKENS) - 1), dtype="float32"),
        },
    )


def _logprobs(tc: tinker.TrainingClient) -> np.ndarray:
    out = tc.forward([_datum()], "cross_entropy").result(timeout=TIMEOUT)
    return np.asarray(out.loss_fn_outputs[0]["logprobs"].data, np.float64)


def _step(tc: tinker.TrainingClient, lr: float = 2e-2) -> None:
    tc.forward_backward([_datum()], "cross_entropy").result(timeout=TIMEOUT)
    tc.optim_step(types.AdamParams(learning_rate=lr)).result(timeout=TIMEOUT)


def _raw_fwdbwd_body(model_id: str, seq_id: int) -> bytes:
    datum = tx_types.Datum(
        model_input=tx_types.ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs={"target_tokens": tx_types.TensorData(data=TOKENS[1:], dtype="int64")},
    )
    fb_input = tx_types.ForwardBackwardInput(data=[datum], loss_fn="cross_entropy")
    return encode_forward_backward_request(model_id, seq_id, fb_input, False, compress=False)


def test_resubmitted_body_returns_the_original_request_and_runs_once(
    live: RunningServer, sdk_service: Callable[[RunningServer], tinker.ServiceClient]
) -> None:
    """§10.6: a re-POST with the same (model_id, seq_id) is the same request, executed once."""
    sc = sdk_service(live)
    once, twice = (
        sc.create_lora_training_client(BASE, rank=4, seed=11).result(timeout=TIMEOUT)
        for _ in range(2)
    )
    headers = {"X-API-Key": API_KEY, "Content-Type": "application/x-protobuf"}
    ids = []
    for tc, posts in ((once, 1), (twice, 2)):
        body = _raw_fwdbwd_body(tc.model_id, seq_id=10_000)
        for _ in range(posts):
            r = httpx.post(f"{live.url}/api/v1/forward_backward", content=body, headers=headers)
            assert r.status_code == 200, r.text
            ids.append(r.json()["request_id"])
    assert ids[1] == ids[2], "the retried body must map to the original request id"
    assert ids[0] != ids[1]
    for tc in (once, twice):  # a doubly counted gradient would make the two steps differ
        tc.optim_step(types.AdamParams(learning_rate=5e-2)).result(timeout=TIMEOUT)
    np.testing.assert_allclose(_logprobs(once), _logprobs(twice), rtol=1e-6, atol=1e-7)


@pytest.mark.filterwarnings("ignore:DEPRECATED. TrainingClient.load_state:FutureWarning")
def test_internal_fault_is_a_server_error_and_the_server_keeps_serving(
    live: RunningServer, sdk_service: Callable[[RunningServer], tinker.ServiceClient]
) -> None:
    """§10.8: a checkpoint damaged on disk behind the server's back is a ``server`` failure."""
    sc = sdk_service(live)
    tc = sc.create_lora_training_client(BASE, rank=4, seed=5).result(timeout=TIMEOUT)
    _step(tc)
    path = tc.save_state("to-break").result(timeout=TIMEOUT).path
    directory = live.settings.checkpoint_root / tc.model_id / "weights" / "to-break"
    damaged = sorted(directory.rglob("*.safetensors"))
    assert damaged, f"no safetensors under {directory}"
    for file in damaged:
        file.write_bytes(b"\x00garbage, not a safetensors header")
    with pytest.raises(tinker.RequestFailedError) as failure:
        tc.load_state(path).result(timeout=TIMEOUT)
    assert failure.value.category == types.RequestErrorCategory.Server
    _step(tc)  # same model, same server: still serving
    assert np.all(_logprobs(tc) < 0)


def test_weights_only_restore_resets_the_optimizer_moments(
    live: RunningServer, sdk_service: Callable[[RunningServer], tinker.ServiceClient]
) -> None:
    """§10.9: ``create_training_client_from_state`` keeps weights but starts fresh moments."""
    sc = sdk_service(live)
    src = sc.create_lora_training_client(BASE, rank=4, seed=8).result(timeout=TIMEOUT)
    for _ in range(3):
        _step(src)
    path = src.save_state("w").result(timeout=TIMEOUT).path
    fresh = sc.create_training_client_from_state(path).result(timeout=TIMEOUT)
    with_opt = sc.create_training_client_from_state_with_optimizer(path).result(timeout=TIMEOUT)
    start = _logprobs(src)
    for tc in (fresh, with_opt):
        np.testing.assert_allclose(_logprobs(tc), start, rtol=1e-6, atol=1e-7)
    for tc in (src, fresh, with_opt):
        _step(tc)
    np.testing.assert_allclose(_logprobs(with_opt), _logprobs(src), rtol=1e-5, atol=1e-6)
    # Fresh AdamW moves every parameter by ~lr on its first step; restored moments do not.
    assert np.max(np.abs(_logprobs(fresh) - _logprobs(src))) > 1e-3


def test_rest_pagination_and_lookup_by_path(
    live: RunningServer, sdk_service: Callable[[RunningServer], tinker.ServiceClient]
) -> None:
    """§10.14: ``cursor.total_count`` with offset/limit, and run lookup by tinker path."""
    sc = sdk_service(live)
    made = [
        sc.create_lora_training_client(BASE, rank=2, seed=i, user_metadata={"i": str(i)})
        .result(timeout=TIMEOUT)
        .model_id
        for i in range(3)
    ]
    rest = tinker.RestClient(base_url=live.url, api_key=API_KEY)
    total = rest.list_training_runs(limit=1).result(timeout=30).cursor.total_count
    assert total >= 3
    seen = []
    for offset in range(total):
        page = rest.list_training_runs(limit=1, offset=offset).result(timeout=30)
        assert len(page.training_runs) == 1
        assert page.cursor.total_count == total
        seen.append(page.training_runs[0].training_run_id)
    assert len(set(seen)) == total
    assert set(made) <= set(seen)
    run = rest.get_training_run_by_tinker_path(f"tinker://{made[1]}/weights/x").result(timeout=30)
    assert run.training_run_id == made[1]
    assert run.user_metadata == {"i": "1"}


def test_context_manager_finishes_the_session(
    live: RunningServer, sdk_service: Callable[[RunningServer], tinker.ServiceClient]
) -> None:
    """§10.15: leaving ``with ServiceClient()`` calls ``/finish``; later heartbeats get 410."""
    with sdk_service(live) as sc:
        tc = sc.create_lora_training_client(BASE, rank=2, seed=1).result(timeout=TIMEOUT)
        session_id = sc.holder.get_session_id()
        _step(tc)
    assert f"POST /api/v1/sessions/{session_id}/finish" in live.recorder.calls
    beat = httpx.post(
        f"{live.url}/api/v1/session_heartbeat",
        json={"session_id": session_id, "type": "session_heartbeat"},
        headers={"X-API-Key": API_KEY},
    )
    assert beat.status_code == 410, beat.text


@pytest.fixture(scope="module")
def chunked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server that tells clients to send one datum per fwd/bwd request."""
    engine = EngineSettings(max_lora_rank=8, max_lora_adapters=4, max_seq_len=64)
    root = tmp_path_factory.mktemp("chunked")
    flags = ClientFlags(fwdbwd_max_chunk_len=1)
    with run_hub_model_server(root, base_models=[BASE], engine=engine, client=flags) as server:
        yield server


def _varied_data() -> list[types.Datum]:
    """Four datums of different lengths, so an output in the wrong place cannot pass."""
    out = []
    for n in (5, 9, 7, 11):
        tokens = TOKENS[:n]
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": types.TensorData(data=tokens[1:], dtype="int64")},
            )
        )
    return out


def test_chunked_batch_keeps_order_and_steps_after_all_chunks(
    chunked: RunningServer, sdk_service: Callable[[RunningServer], tinker.ServiceClient]
) -> None:
    """§10.5: 4 one-datum chunks + an immediate optim_step == the same work done unchunked."""
    sc = sdk_service(chunked)
    piped, reference = (
        sc.create_lora_training_client(BASE, rank=4, seed=21).result(timeout=TIMEOUT)
        for _ in range(2)
    )
    data = _varied_data()
    adam = types.AdamParams(learning_rate=5e-2)
    calls_before = chunked.recorder.calls.count("POST /api/v1/forward_backward")
    fb = piped.forward_backward(data, "cross_entropy")  # not awaited before the step
    step = piped.optim_step(adam)
    outputs = fb.result(timeout=TIMEOUT).loss_fn_outputs
    step.result(timeout=TIMEOUT)
    assert chunked.recorder.calls.count("POST /api/v1/forward_backward") - calls_before == 4
    assert [len(o["logprobs"].data) for o in outputs] == [
        len(d.model_input.to_ints()) for d in data
    ]
    for datum in data:  # the reference: each datum's gradient, all before one step
        reference.forward_backward([datum], "cross_entropy").result(timeout=TIMEOUT)
    reference.optim_step(adam).result(timeout=TIMEOUT)
    after = [piped.forward(data, "cross_entropy"), reference.forward(data, "cross_entropy")]
    got, want = (f.result(timeout=TIMEOUT).loss_fn_outputs for f in after)
    for g, w, first in zip(got, want, outputs, strict=True):
        np.testing.assert_allclose(g["logprobs"].data, w["logprobs"].data, rtol=1e-5, atol=1e-6)
        assert not np.allclose(g["logprobs"].data, first["logprobs"].data)  # the step happened
