"""Backpressure: over the unfinished-request limit, submissions answer 429 + Retry-After.

Raw HTTP checks the status, headers and which submissions count (no worker: requests stay
pending until the test finishes them through the worker-side queue). The SDK check runs the
unmodified tinker SDK 0.38.0 against a live API with a limit of one unfinished request per
tenant, submitting a burst while the worker is stopped and then restarting it: every training
and sampling call must still complete, via 429 retries.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tinker import types

from tx_server.settings import EngineSettings
from tx_server.testing import API_KEY, RunningServer, make_settings, offline_hub, run_server
from tx_server.worker.loop import worker_thread

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


def _datum(shift: int) -> types.Datum:
    tokens = [(t + shift) % 200 + 1 for t in TOKENS]
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=tokens[1:], dtype="int64"),
            "weights": types.TensorData(data=[1.0] * (len(tokens) - 1), dtype="float32"),
        },
    )


def _wait_for(condition: Callable[[], bool], what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_sdk_completes_every_request_under_a_limit_of_one(
    tmp_path: Path, open_service_client: Callable[..., Any]
) -> None:
    """The burst is submitted while no worker runs, so the blocking sample certainly holds the
    tenant's one place and every later call is refused at first, whatever the machine's speed.
    A restarted worker (recovering the trained run) then lets everything through."""
    # The sampling tests' engine shapes, so a full run can reuse their jax compilations.
    engine = EngineSettings(
        max_lora_rank=16, max_lora_adapters=12, max_seq_len=64, sample_tokens_per_batch=512
    )
    settings = make_settings(
        tmp_path,
        base_models=[BASE],
        engine=engine,
        long_poll_seconds=20.0,
        max_pending_futures_per_tenant=1,
        backpressure_retry_after_seconds=0.2,
    )
    with offline_hub(tmp_path / "hf"), run_server(settings) as server:
        sc = open_service_client(server.url, API_KEY)
        with worker_thread(settings):
            tc = sc.create_lora_training_client(BASE, rank=4, seed=0).result(timeout=120)
            tc.forward_backward([_datum(9)], "cross_entropy").result(timeout=180)
            tc.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=180)
            sampler = tc.save_weights_and_get_sampling_client().result(timeout=180)
            params = types.SamplingParams(max_tokens=3, temperature=1.0, seed=1)
            prompt = types.ModelInput.from_ints(TOKENS[:3])
            sampler.sample(prompt, 1, params).result(timeout=180)

        calls = server.recorder.calls

        def count(route: str) -> int:
            return calls.count(f"POST /api/v1/{route}")

        fb_before, sample_before = count("forward_backward"), count("asample")
        blocker = sampler.sample(prompt, 8, types.SamplingParams(max_tokens=20, seed=2))
        _wait_for(lambda: count("asample") > sample_before, "the blocker was never submitted")
        futures = [tc.forward_backward([_datum(i)], "cross_entropy") for i in range(4)]
        step = tc.optim_step(types.AdamParams(learning_rate=1e-2))
        samples = [sampler.sample(prompt, 1, params) for _ in range(3)]
        _wait_for(lambda: count("forward_backward") > fb_before + 1, "no forward_backward retry")
        _wait_for(lambda: count("asample") > sample_before + 2, "no sample retry")

        with worker_thread(settings):
            losses = [f.result(timeout=180).metrics["loss:sum"] for f in futures]
            step.result(timeout=180)
            assert all(np.isfinite(losses))
            assert len(set(losses)) == 4
            assert all(len(s.result(timeout=180).sequences[0].tokens) == 3 for s in samples)
            assert len(blocker.result(timeout=180).sequences) == 8
        sc.holder.close()
