"""Training through the unmodified tinker SDK 0.38.0 against a live API + worker thread.

Served model: the tiny Qwen3 of the tx-engine kit, installed into a private Hugging Face cache
under the hub name ``Qwen/Qwen3-8B``. The worker runs in a thread of this process (the process
mode is covered in ``test_server_training_process.py``); everything else is real: uvicorn on
127.0.0.1, SQLite in a temp dir, the engine, the SDK's own HTTP, protobuf and retry code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from tx_server.settings import EngineSettings
from tx_server.testing import API_KEY, RunningServer, run_hub_model_server

BASE = "Qwen/Qwen3-8B"
TOKENS = [5, 17, 42, 9, 101, 77, 3, 250, 64, 12, 33, 8]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    engine = EngineSettings(max_lora_rank=16, max_lora_adapters=12, max_seq_len=64)
    root = tmp_path_factory.mktemp("training")
    with run_hub_model_server(root, base_models=[BASE], engine=engine) as server:
        yield server


def _datum(tokens: list[int] = TOKENS, weights: list[float] | None = None) -> types.Datum:
    weights = weights if weights is not None else [1.0] * (len(tokens) - 1)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=tokens[1:], dtype="int64"),
            "weights": types.TensorData(data=weights, dtype="float32"),
        },
    )


def _logprobs(out: types.ForwardBackwardOutput) -> list[np.ndarray]:
    return [np.asarray(o["logprobs"].data, np.float64) for o in out.loss_fn_outputs]


def _step(tc: tinker.TrainingClient, lr: float = 2e-2) -> float:
    out = tc.forward_backward([_datum()], "cross_entropy").result(timeout=120)
    tc.optim_step(types.AdamParams(learning_rate=lr)).result(timeout=120)
    return float(out.metrics["loss:sum"])


def test_sft_loss_falls_and_outputs_are_consistent(
    live: RunningServer, sdk_service: Callable[[RunningServer], tinker.ServiceClient]
) -> None:
    sc = sdk_service(live)
    tc = sc.create_lora_training_client(BASE, rank=8, seed=1).result(timeout=120)
    assert tc.model_id == f"{sc.holder.get_session_id()}:train:0"
    info = tc.get_info()
    assert info.model_data.model_name == BASE
    weights = [1.0, 0.5, 0.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    datum = _datum(weights=weights)
    fwd = tc.forward([datum], "cross_entropy").result(timeout=120)
    fb = tc.forward_backward([datum], "cross_entropy").result(timeout=120)
    (lp_f,), (lp_fb,) = _logprobs(fwd), _logprobs(fb)
    assert lp_f.shape == (len(TOKENS) - 1,)
    np.testing.assert_allclose(lp_f, lp_fb, rtol=1e-5, atol=1e-6)
    assert np.all(lp_fb < 0)
    expected = float(np.sum(-lp_fb * np.asarray(weights)))
    assert fb.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4)
    elementwise = np.asarray(fb.loss_fn_outputs[0]["elementwise_loss"].data)
    np.testing.assert_allclose(elementwise, -lp_fb * np.asarray(weights), rtol=1e-4, atol=1e-6)
    tc.optim_step(types.AdamParams(learning_rate=2e-2)).result(timeout=120)
    losses = [_step(tc) for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_pipelined_steps_match_sequential(
    live: RunningServer, sdk_service: Callable[[RunningServer], tinker.ServiceClient]
) -> None:
    sc = sdk_service(live)
    seq = sc.create_lora_training_client(BASE, rank=8, seed=7).result(timeout=120)
    pipe = sc.create_lora_training_client(BASE, rank=8, seed=7).result(timeout=120)
    assert pipe.model_id.endswith(":train:1")
    for _ in range(3):
        _step(seq)
    futures = []
    for _ in range(3):  # submitted without waiting; the server keeps the per-model order
        futures.append(pipe.forward_backward([_datum()], "cross_entropy"))
        futures.append(pipe.optim_step(types.AdamParams(learning_rate=2e-2)))
    for f in futures:
        f.result(timeout=120)
    final = [tc.forward([_datum()], "cross_entropy").result(timeout=120) for tc in (seq, pipe)]
    assert final[0].metrics["loss:sum"] == pytest.approx(final[1].metrics["loss:sum"], rel=1e-5)


def test_save_state_restores_weights_and_optimizer(
    live: RunningServer, sdk_service: Callable[[RunningServer], tinker.ServiceClient]
) -> None:
    sc = sdk_service(live)
    tc = sc.create_lora_training_client(BASE, rank=4, seed=3, user_metadata={"k": "v"}).result(
        timeout=120
    )
    for _ in range(2):
        _step(tc)
    path = tc.save_state("ckpt-a").result(timeout=120).path
    assert path == f"tinker://{tc.model_id}/weights/ckpt-a"
    restored = sc.create_training_client_from_state_with_optimizer(path).result(timeout=120)
    assert restored.model_id == f"{sc.holder.get_session_id()}:train:1"
    before = [_logprobs(c.forward([_datum()], "cross_entropy").result(120)) for c in (tc, restored)]
    np.testing.assert_allclose(before[0][0], before[1][0], rtol=1e-6, atol=1e-6)
    after = [
        _step(c) and _logprobs(c.forward([_datum()], "cross_entropy").result(120))
        for c in (tc, restored)
    ]
    np.testing.assert_allclose(after[0][0], after[1][0], rtol=1e-5, atol=1e-6)  # same moments

    with pytest.raises(tinker.RequestFailedError) as clash:
        tc.save_state("ckpt-a").result(timeout=120)
    assert clash.value.category == "user"
    assert "already exists" in str(clash.value)

    rest = tinker.RestClient(base_url=live.url, api_key=API_KEY)
    run = rest.get_training_run(tc.model_id).result(timeout=30)
    assert run.base_model == BASE
    assert run.lora_rank == 4
    assert run.user_metadata == {"k": "v"}
    assert run.last_checkpoint is not None
    assert run.last_checkpoint.tinker_path == path
    info = rest.get_weights_info_by_tinker_path(path).result(timeout=30)
    assert (info.base_model, info.lora_rank) == (BASE, 4)
    sampler = tc.save_weights_for_sampler("s1").result(timeout=120)
    assert sampler.path == f"tinker://{tc.model_id}/sampler_weights/s1"
    listed = rest.list_checkpoints(tc.model_id).result(timeout=30).checkpoints
    assert sorted(c.checkpoint_id for c in listed) == ["sampler_weights/s1", "weights/ckpt-a"]
    sampling = tc.save_weights_and_get_sampling_client().result(timeout=120)
    session_id = sc.holder.get_session_id()
    assert sampling._sampling_session_id == f"{session_id}:sample:0"
    snapshot = live.settings.checkpoint_root / tc.model_id / "sampler_weights" / "ephemeral-0"
    assert (snapshot / "adapter.safetensors").is_file()  # what tx's sampler loads
    assert not (snapshot / "adapter_config.json").exists()  # PEFT: named checkpoints only
    named = live.settings.checkpoint_root / tc.model_id / "sampler_weights" / "s1"
    assert (named / "adapter_config.json").is_file()
    runs = rest.list_training_runs().result(timeout=30)
    assert tc.model_id in [r.training_run_id for r in runs.training_runs]
    rest.delete_checkpoint_from_tinker_path(path).result(timeout=30)
    listed = rest.list_checkpoints(tc.model_id).result(timeout=30).checkpoints
    assert [c.checkpoint_id for c in listed] == ["sampler_weights/s1"]


def test_bad_requests_fail_as_user_errors_and_server_keeps_serving(
    live: RunningServer, sdk_service: Callable[[RunningServer], tinker.ServiceClient]
) -> None:
    sc = sdk_service(live)
    for kwargs in ({"base_model": "no/such-model", "rank": 8}, {"base_model": BASE, "rank": 32}):
        with pytest.raises(tinker.RequestFailedError) as err:
            sc.create_lora_training_client(**kwargs).result(timeout=120)
        assert err.value.category == "user"
    assert "served" in str(err.value) or "max_lora_rank" in str(err.value)
    tc = sc.create_lora_training_client(BASE, rank=8, seed=5).result(timeout=120)
    too_big = _datum(tokens=[*TOKENS[:-1], 10**6])
    with pytest.raises(tinker.RequestFailedError) as bad_token:
        tc.forward_backward([too_big], "cross_entropy").result(timeout=120)
    assert bad_token.value.category == "user"
    # Named within the request (its datum 0), not by its place in the worker's engine call.
    assert "failed: data[0]" in str(bad_token.value), str(bad_token.value)
    mismatch = _datum(weights=[1.0, 1.0])
    with pytest.raises(tinker.RequestFailedError) as bad_shape:
        tc.forward_backward([mismatch], "cross_entropy").result(timeout=120)
    assert bad_shape.value.category == "user"
    assert "weights" in str(bad_shape.value)
    ok = tc.forward_backward([_datum()], "cross_entropy").result(timeout=120)
    assert ok.metrics["loss:sum"] > 0


def test_other_tenants_model_is_not_found(
    live: RunningServer, sdk_service: Callable[[RunningServer], tinker.ServiceClient]
) -> None:
    sc = sdk_service(live)
    tc = sc.create_lora_training_client(BASE, rank=2, seed=0).result(timeout=120)
    other = {"X-API-Key": "tml-someone-else-entirely-0002"}
    response = httpx.post(
        f"{live.url}/api/v1/get_info", json={"model_id": tc.model_id}, headers=other
    )
    assert response.status_code == 404
    mine = httpx.post(
        f"{live.url}/api/v1/get_info",
        json={"model_id": tc.model_id},
        headers={"X-API-Key": API_KEY},
    )
    assert mine.json()["model_data"]["tokenizer_id"] == BASE


def test_undecodable_forward_backward_is_a_user_failure(live: RunningServer) -> None:
    headers = {"X-API-Key": API_KEY, "Content-Type": "application/x-protobuf"}
    sub = httpx.post(
        f"{live.url}/api/v1/forward_backward", content=b"\xff\xff\x00", headers=headers
    )
    assert sub.status_code == 200
    res = httpx.post(
        f"{live.url}/api/v1/retrieve_future",
        json={"request_id": sub.json()["request_id"]},
        headers={"X-API-Key": API_KEY},
        timeout=30,
    )
    assert res.json()["category"] == "user"
    assert "decoded" in res.json()["error"]


def test_zstd_forward_body_is_accepted(
    live: RunningServer, sdk_service: Callable[[RunningServer], tinker.ServiceClient]
) -> None:
    from tx_types import Datum, ForwardBackwardInput, ModelInput, TensorData
    from tx_types.proto import decode_forward_backward_output, encode_forward_backward_request

    sc = sdk_service(live)
    tc = sc.create_lora_training_client(BASE, rank=2, seed=0).result(timeout=120)
    expected = tc.forward([_datum()], "cross_entropy").result(timeout=120)
    datum = Datum(
        model_input=ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs={
            "target_tokens": TensorData(data=TOKENS[1:], dtype="int64"),
            "weights": TensorData(data=[1.0] * (len(TOKENS) - 1), dtype="float32"),
        },
    )
    fwd = ForwardBackwardInput(data=[datum], loss_fn="cross_entropy")
    body = encode_forward_backward_request(tc.model_id, 99, fwd, forward_only=True, compress=True)
    headers = {
        "X-API-Key": API_KEY,
        "Content-Type": "application/x-protobuf",
        "Content-Encoding": "zstd",
    }
    sub = httpx.post(f"{live.url}/api/v1/forward_backward", content=body, headers=headers)
    res = httpx.post(
        f"{live.url}/api/v1/retrieve_future",
        json={"request_id": sub.json()["request_id"]},
        headers={"X-API-Key": API_KEY},
        timeout=60,
    )
    assert res.headers["content-type"].startswith("application/x-protobuf")
    out = decode_forward_backward_output(res.content)
    np.testing.assert_allclose(
        out.loss_fn_outputs[0]["logprobs"].data, _logprobs(expected)[0], rtol=1e-6
    )
