"""Backpressure: over the unfinished-request limit, submissions answer 429 + Retry-After.

Raw HTTP checks the status, headers and which submissions count (no worker: requests stay
pending until the test finishes them through the worker-side queue). The SDK check runs the
unmodified tinker SDK 0.38.0 against a live API + worker with a limit of one unfinished
request per tenant: every training and sampling call must still complete, via 429 retries.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from tx_server.settings import EngineSettings
from tx_server.testing import (
    API_KEY,
    RunningServer,
    make_settings,
    run_hub_model_server,
    run_server,
)

KEY_B = "tml-tx-server-tests-key-0002"
BASE = "Qwen/Qwen3-8B"
TOKENS = [5, 17, 42, 9, 101, 77, 3, 250, 64, 12]


def _post(server: RunningServer, path: str, body: dict[str, object], key: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/api/v1/{path}", json=body, headers={"X-API-Key": key}, timeout=30
    )


def _create_model(server: RunningServer, session_id: str, seq: int, key: str) -> httpx.Response:
    body = {"session_id": session_id, "model_seq_id": seq, "base_model": "Qwen/Qwen3-0.6B"}
    return _post(server, "create_model", body, key)


def _session(server: RunningServer, key: str) -> str:
    return str(_post(server, "create_session", {"sdk_version": "0.38.0"}, key).json()["session_id"])


def test_per_tenant_limit_answers_429_with_retry_after(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, max_pending_futures_per_tenant=2, backpressure_retry_after_seconds=0.25
    )
    with run_server(settings) as server:
        session_a = _session(server, API_KEY)
        first = _create_model(server, session_a, 0, API_KEY)
        assert _create_model(server, session_a, 1, API_KEY).status_code == 200
        refused = _create_model(server, session_a, 2, API_KEY)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"  # whole seconds, rounded up
        assert refused.headers["retry-after-ms"] == "250"
        assert "max_pending_futures_per_tenant=2" in refused.json()["detail"]
        assert int(refused.headers["content-length"]) > 0
        again = _create_model(server, session_a, 0, API_KEY)  # a retry adds no work
        assert again.json()["request_id"] == first.json()["request_id"]
        session_b = _session(server, KEY_B)
        assert _create_model(server, session_b, 0, KEY_B).status_code == 200  # own budget

        queue = server.queue()
        (claimed,) = queue.claim_pending(limit=1)
        queue.complete(claimed.request_id, b'{"model_id": "x"}', "application/json")
        queue.db.dispose()
        assert _create_model(server, session_a, 2, API_KEY).status_code == 200


def test_global_limit_counts_every_tenant(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, max_pending_futures=2)
    with run_server(settings) as server:
        session_a, session_b = _session(server, API_KEY), _session(server, KEY_B)
        assert _create_model(server, session_a, 0, API_KEY).status_code == 200
        assert _create_model(server, session_b, 0, KEY_B).status_code == 200
        refused = _create_model(server, session_b, 1, KEY_B)
        assert refused.status_code == 429
        assert "max_pending_futures=2" in refused.json()["detail"]
        assert refused.headers["retry-after"] == "1"


@pytest.fixture(scope="module")
def throttled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # The sampling tests' engine shapes, so a full run can reuse their jax compilations.
    engine = EngineSettings(
        max_lora_rank=16, max_lora_adapters=12, max_seq_len=64, sample_tokens_per_batch=512
    )
    root = tmp_path_factory.mktemp("backpressure")
    overrides = {"max_pending_futures_per_tenant": 1, "backpressure_retry_after_seconds": 0.2}
    with run_hub_model_server(root, base_models=[BASE], engine=engine, **overrides) as server:
        yield server


def _datum(shift: int) -> types.Datum:
    tokens = [(t + shift) % 200 + 1 for t in TOKENS]
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=tokens[1:], dtype="int64"),
            "weights": types.TensorData(data=[1.0] * (len(tokens) - 1), dtype="float32"),
        },
    )


def test_sdk_completes_every_request_under_a_limit_of_one(throttled: RunningServer) -> None:
    sc = tinker.ServiceClient(base_url=throttled.url, api_key=API_KEY)
    tc = sc.create_lora_training_client(BASE, rank=4, seed=0).result(timeout=120)
    # Warm-up (compiles), so the burst below is refused for a short time only: the SDK's
    # transport layer then retries after Retry-After instead of its holder's long backoff.
    tc.forward_backward([_datum(9)], "cross_entropy").result(timeout=180)
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=180)
    sampler = tc.save_weights_and_get_sampling_client().result(timeout=180)
    params = types.SamplingParams(max_tokens=3, temperature=1.0, seed=1)
    prompt = types.ModelInput.from_ints(TOKENS[:3])
    sampler.sample(prompt, 1, params).result(timeout=180)  # warm-up

    # A long sample holds the tenant's one pending place, so everything submitted while it
    # runs is refused at first, whatever the machine's speed (without it, a fast worker could
    # finish each request before the next arrived and nothing would be refused).
    calls = throttled.recorder.calls
    fb_before, sample_before = (
        calls.count(f"POST /api/v1/{r}") for r in ("forward_backward", "asample")
    )
    long = types.SamplingParams(max_tokens=40, temperature=1.0, seed=2, stop=[])
    blocker = sampler.sample(prompt, 8, long)
    deadline = time.monotonic() + 60
    while calls.count("POST /api/v1/asample") == sample_before:
        assert time.monotonic() < deadline, "the blocking sample was never submitted"
        time.sleep(0.005)
    futures = [tc.forward_backward([_datum(i)], "cross_entropy") for i in range(4)]
    step = tc.optim_step(types.AdamParams(learning_rate=1e-2))
    samples = [sampler.sample(prompt, 1, params) for _ in range(3)]
    losses = [f.result(timeout=180).metrics["loss:sum"] for f in futures]
    step.result(timeout=180)
    assert all(np.isfinite(losses))
    assert len(set(losses)) == 4
    assert all(len(s.result(timeout=180).sequences[0].tokens) == 3 for s in samples)
    assert len(blocker.result(timeout=180).sequences) == 8
    refused_fb = calls.count("POST /api/v1/forward_backward") - fb_before - 4
    refused_samples = calls.count("POST /api/v1/asample") - sample_before - 4
    assert refused_fb > 0, "no forward_backward was refused: the limit did not apply"
    assert refused_samples > 0, "no sample was refused: the limit did not apply"
    sc.holder.close()
