"""Restart recovery: after the worker restarts, live training runs continue exactly.

A real uvicorn API, SQLite file and checkpoint directory stay up while the worker (a thread of
this process with its own engines, so a restart really loses every adapter) is stopped and a
fresh one started, as the supervisor does after a crash. A request the dead worker had claimed
is reproduced by claiming it from the queue and never running it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tinker
from sqlalchemy import select
from tinker import types

from tx_server.db.database import Database
from tx_server.db.models import FutureRow, FutureStatus, ModelRow
from tx_server.settings import EngineSettings
from tx_server.testing import API_KEY, RunningServer, make_settings, offline_hub, run_server
from tx_server.work_queue import RESTART_MESSAGE, ClaimedRequest, WorkQueue
from tx_server.worker.loop import worker_thread

BASE = "Qwen/Qwen3-8B"
TOKENS = [5, 17, 42, 9, 101, 77, 3, 250, 64, 12, 33, 8]


@contextlib.contextmanager
def api_only(root: Path, **overrides: object) -> Iterator[RunningServer]:
    """The API over ``root``'s SQLite file and the kit's tiny model as ``BASE``; no worker."""
    engine = EngineSettings(max_lora_rank=8, max_seq_len=64, max_lora_adapters=4)
    values = {"long_poll_seconds": 20.0, "base_models": [BASE], "engine": engine, **overrides}
    with offline_hub(root / "hf"), run_server(make_settings(root, **values)) as server:
        yield server


def datum(shift: int = 0) -> types.Datum:
    tokens = [(t + shift) % 256 for t in TOKENS]
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": types.TensorData(data=tokens[1:], dtype="int64")},
    )


def logprobs(tc: tinker.TrainingClient) -> np.ndarray:
    out = tc.forward([datum()], "cross_entropy").result(timeout=120)
    return np.asarray(out.loss_fn_outputs[0]["logprobs"].data, np.float64)


def train_step(tc: tinker.TrainingClient, shift: int, optim: bool = True) -> None:
    tc.forward_backward([datum(shift)], "cross_entropy").result(timeout=120)
    if optim:
        tc.optim_step(types.AdamParams(learning_rate=5e-2)).result(timeout=120)


def claim_when_submitted(queue: WorkQueue, limit: int = 8) -> list[ClaimedRequest]:
    """Claim like a worker once the SDK's (asynchronous) submission has landed."""
    deadline = time.monotonic() + 60
    while not (claimed := queue.claim_pending(limit=limit)):
        assert time.monotonic() < deadline, "the request was never submitted"
        time.sleep(0.05)
    return claimed


def futures_by_id(queue: WorkQueue) -> dict[str, FutureRow]:
    with queue.db.read() as session:
        return {r.request_id: r for r in session.scalars(select(FutureRow)).all()}


def slot_of(server: RunningServer, model_id: str) -> int | None:
    db = Database(server.settings.database_url)
    try:
        with db.read() as session:
            row = session.get(ModelRow, model_id)
            assert row is not None
            return row.adapter_slot
    finally:
        db.dispose()


def test_a_restarted_worker_continues_each_run_exactly(
    tmp_path: Path, open_service_client: Callable[..., Any]
) -> None:
    with api_only(tmp_path) as server:
        sc = open_service_client(server.url, API_KEY)
        with worker_thread(server.settings):
            tc = sc.create_lora_training_client(BASE, rank=4, seed=3).result(timeout=120)
            train_step(tc, 0)
            train_step(tc, 1)
            saved_path = tc.save_state("s1").result(timeout=120).path
            after_save = logprobs(tc)
            train_step(tc, 2, optim=False)  # gradients pending when the worker dies
        assert slot_of(server, tc.model_id) is not None

        # While no worker runs: a request that the dead worker had claimed (now ``running``).
        doomed = tc.forward_backward([datum(9)], "cross_entropy")
        queue = WorkQueue(Database(server.settings.database_url))
        (claimed,) = claim_when_submitted(queue)
        assert claimed.model_id == tc.model_id
        queue.db.dispose()

        with worker_thread(server.settings):
            with pytest.raises(tinker.RequestFailedError) as failed:
                doomed.result(timeout=120)
            assert failed.value.category == tinker.types.RequestErrorCategory.Server
            assert RESTART_MESSAGE in str(failed.value)
            assert slot_of(server, tc.model_id) is None  # restored lazily, on first use

            np.testing.assert_allclose(logprobs(tc), after_save, rtol=0, atol=1e-6)
            assert slot_of(server, tc.model_id) is not None
            tc.optim_step(types.AdamParams(learning_rate=5e-2)).result(timeout=120)
            recovered = logprobs(tc)

            # The same history without a restart, on a second run with the same seed.
            ref = sc.create_lora_training_client(BASE, rank=4, seed=3).result(timeout=120)
            train_step(ref, 0)
            train_step(ref, 1)
            train_step(ref, 2)
            np.testing.assert_allclose(recovered, logprobs(ref), rtol=1e-5, atol=1e-5)
            assert not np.allclose(recovered, after_save, atol=1e-4)  # the replayed step counted

            # The saved checkpoint is untouched by recovery and still loads.
            loaded = sc.create_training_client_from_state_with_optimizer(saved_path)
            np.testing.assert_allclose(
                logprobs(loaded.result(timeout=120)), after_save, rtol=1e-5, atol=1e-6
            )
        sc.holder.close()


def test_steps_whose_snapshots_never_reached_the_disk_are_replayed(
    tmp_path: Path, open_service_client: Callable[..., Any]
) -> None:
    """Snapshots are written after the step completes; a restore replays what they missed."""
    with api_only(tmp_path) as server:
        sc = open_service_client(server.url, API_KEY)
        with worker_thread(server.settings):
            tc = sc.create_lora_training_client(BASE, rank=4, seed=5).result(timeout=120)
            for shift in range(3):
                train_step(tc, shift)
            trained = logprobs(tc)
        snapshots = server.settings.checkpoint_root / tc.model_id / "recovery"
        kept = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime_ns)
        assert 1 <= len(kept) <= 2  # cut when idle, at the latest when the worker stopped

        shutil.rmtree(kept[-1])  # as if the worker had died before taking the last snapshot
        with worker_thread(server.settings):
            np.testing.assert_allclose(logprobs(tc), trained, rtol=0, atol=1e-6)
            train_step(tc, 3)
            stepped = logprobs(tc)
        shutil.rmtree(snapshots)  # none at all: the seeded init plus every completed request
        with worker_thread(server.settings):
            np.testing.assert_allclose(logprobs(tc), stepped, rtol=1e-5, atol=1e-5)
            train_step(tc, 4)
        assert snapshots.is_dir()

        # The session ends while no worker holds the run: the next worker deletes its snapshots.
        sc.close("success").result(timeout=60)
        with worker_thread(server.settings):
            deadline = time.monotonic() + 30
            while snapshots.exists():
                assert time.monotonic() < deadline, "the orphaned snapshots were never removed"
                time.sleep(0.1)


def test_a_nonfinite_step_is_refused_spends_its_gradient_and_replays_so(
    tmp_path: Path, open_service_client: Callable[..., Any]
) -> None:
    """Huge weights make the loss (and gradient) inf: the optim_step after it fails as a
    ``user`` error and leaves the adapter as it was, instead of NaN-poisoning it for good; the
    next steps train normally. A restore replays the refused step too, so the inf gradient is
    spent there as well and the restored run equals the live one."""
    with api_only(tmp_path) as server:
        sc = open_service_client(server.url, API_KEY)
        with worker_thread(server.settings):
            tc = sc.create_lora_training_client(BASE, rank=4, seed=7).result(timeout=120)
            train_step(tc, 0)
            before = logprobs(tc)
            huge = datum(1)
            huge.loss_fn_inputs["weights"] = types.TensorData(
                data=[3e38] * (len(TOKENS) - 1), dtype="float32"
            )
            out = tc.forward_backward([huge], "cross_entropy").result(timeout=120)
            assert not np.isfinite(out.metrics["loss:sum"])
            with pytest.raises(tinker.RequestFailedError) as refused:
                tc.optim_step(types.AdamParams(learning_rate=5e-2)).result(timeout=120)
            assert refused.value.category == tinker.types.RequestErrorCategory.User
            assert "not finite" in str(refused.value)
            np.testing.assert_array_equal(logprobs(tc), before)  # unchanged, not NaN
            train_step(tc, 2)
            trained = logprobs(tc)
            assert np.isfinite(trained).all()
            assert not np.allclose(trained, before, atol=1e-4)
        shutil.rmtree(server.settings.checkpoint_root / tc.model_id / "recovery")
        with worker_thread(server.settings):  # the seeded init plus every completed request
            np.testing.assert_allclose(logprobs(tc), trained, rtol=1e-5, atol=1e-5)
        sc.holder.close()


@pytest.mark.filterwarnings("ignore:DEPRECATED. TrainingClient.load_state:FutureWarning")
def test_a_request_waiting_for_the_worker_is_long_polled(
    tmp_path: Path, open_service_client: Callable[..., Any]
) -> None:
    """§10.7 scaled down: while no worker runs, the SDK's poll of a pending request is held for
    ``long_poll_seconds`` each time (a handful of polls, not a storm), and the result arrives
    promptly once a worker completes it; an unknown request id is 404."""
    with api_only(tmp_path, long_poll_seconds=2.0) as server:
        sc = open_service_client(server.url, API_KEY)
        with worker_thread(server.settings):
            tc = sc.create_lora_training_client(BASE, rank=4, seed=3).result(timeout=120)
            expected = logprobs(tc)
        polls_before = server.recorder.calls.count("POST /api/v1/retrieve_future")
        pending = tc.forward([datum()], "cross_entropy")
        waited = 9.0
        time.sleep(waited)  # nothing can complete it: the SDK keeps long-polling
        polls = server.recorder.calls.count("POST /api/v1/retrieve_future") - polls_before
        assert 2 <= polls <= waited / 2.0 + 2, f"{polls} polls in {waited} s"
        with worker_thread(server.settings):
            out = pending.result(timeout=120)
            received = time.time()
        lp = np.asarray(out.loss_fn_outputs[0]["logprobs"].data, np.float64)
        np.testing.assert_allclose(lp, expected, rtol=0, atol=1e-6)
        db = Database(server.settings.database_url)
        with db.read() as session:
            done = session.scalar(
                select(FutureRow.finished_at)
                .where(FutureRow.model_id == tc.model_id, FutureRow.request_type == "forward")
                .order_by(FutureRow.id.desc())
            )
        db.dispose()
        assert done is not None
        assert received - done.timestamp() < 1.5, "the waiting poll was not woken promptly"
        unknown = httpx.post(
            f"{server.url}/api/v1/retrieve_future",
            json={"request_id": "no-such-request"},
            headers={"X-API-Key": API_KEY},
        )
        assert unknown.status_code == 404
        sc.holder.close()


def test_an_unseeded_run_is_recreated_identically_and_load_state_survives(
    tmp_path: Path, open_service_client: Callable[..., Any]
) -> None:
    with api_only(tmp_path) as server:
        sc = open_service_client(server.url, API_KEY)
        with worker_thread(server.settings):
            fresh = sc.create_lora_training_client(BASE, rank=4).result(timeout=120)
            before = logprobs(fresh)
            trained = sc.create_lora_training_client(BASE, rank=4, seed=1).result(timeout=120)
            train_step(trained, 0)
            path = trained.save_state("t").result(timeout=120).path
            train_step(trained, 1)  # the load below must replace this state
            trained.load_state_with_optimizer(path).result(timeout=120)
            after_load = logprobs(trained)
        db = Database(server.settings.database_url)
        with db.read() as session:
            row = session.get(ModelRow, fresh.model_id)
            assert row is not None
            assert isinstance(row.lora_config["seed"], int)
        db.dispose()
        with worker_thread(server.settings):
            np.testing.assert_allclose(logprobs(fresh), before, rtol=0, atol=1e-6)
            np.testing.assert_allclose(logprobs(trained), after_load, rtol=0, atol=1e-6)
        sc.holder.close()


def test_fail_running_fails_only_running_requests(
    tmp_path: Path, open_service_client: Callable[..., Any]
) -> None:
    with api_only(tmp_path) as server:
        sc = open_service_client(server.url, API_KEY)
        queue = WorkQueue(Database(server.settings.database_url))
        future = sc.create_lora_training_client(BASE, rank=4, seed=0)
        (claimed,) = claim_when_submitted(queue, limit=1)
        waiting = open_service_client(server.url, API_KEY)
        other = waiting.create_lora_training_client(BASE, rank=4, seed=0)
        deadline = time.monotonic() + 60
        while len(futures_by_id(queue)) < 2:
            assert time.monotonic() < deadline, "the second request was never submitted"
            time.sleep(0.05)
        assert queue.fail_running() == 1
        assert queue.fail_running() == 0
        rows = futures_by_id(queue)
        assert rows[claimed.request_id].status == FutureStatus.FAILED
        assert rows[claimed.request_id].error_category == "server"
        pending = [r for r in rows.values() if r.request_id != claimed.request_id]
        assert [r.status for r in pending] == [FutureStatus.PENDING]
        queue.db.dispose()
        with worker_thread(server.settings):
            with pytest.raises(tinker.RequestFailedError):
                future.result(timeout=120)
            assert other.result(timeout=120).model_id.endswith(":train:0")
        sc.holder.close()
        waiting.holder.close()


SDK_ACROSS_KILL = """
import json, sys, tinker
from tinker import types
sc = tinker.ServiceClient(base_url=sys.argv[1], api_key=sys.argv[2])
tc = sc.create_lora_training_client(sys.argv[3], rank=4, seed=0).result(timeout=300)
d = types.Datum(model_input=types.ModelInput.from_ints([5, 17, 42, 9, 101]),
                loss_fn_inputs={"target_tokens": types.TensorData(data=[17, 42, 9, 101, 77],
                                                                   dtype="int64")})
def lp():
    return tc.forward([d], "cross_entropy").result(timeout=300).loss_fn_outputs[0]["logprobs"].data
tc.forward_backward([d], "cross_entropy").result(timeout=300)
tc.optim_step(types.AdamParams(learning_rate=5e-2)).result(timeout=300)
tc.save_state("s").result(timeout=300)
print(json.dumps({"saved": lp()}), flush=True)
sys.stdin.readline()  # the test SIGKILLs the worker meanwhile
after = lp()
fb = tc.forward_backward([d], "cross_entropy").result(timeout=300)
print(json.dumps({"after": after, "loss": fb.metrics["loss:sum"]}), flush=True)
sc.holder.close()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker_pids(server_pid: int) -> list[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=,args=", "--ppid", str(server_pid)], capture_output=True, text=True
    )
    return [int(line.split()[0]) for line in out.stdout.splitlines() if "tx_server.worker" in line]


def _wait_healthy(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, "python -m tx_server exited"
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/api/v1/healthz", timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError("python -m tx_server did not become healthy")


@pytest.mark.slow
def test_a_sigkilled_worker_process_is_restarted_and_the_run_continues(tmp_path: Path) -> None:
    from tx_engine.testing import install_hub_aliases

    install_hub_aliases(tmp_path / "hf")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "TX_PORT": str(port),
        "TX_DATABASE_URL": f"sqlite:///{tmp_path / 'tx.db'}",
        "TX_CHECKPOINT_ROOT": str(tmp_path / "ckpt"),
        "TX_BASE_MODELS": json.dumps([BASE]),
        "TX_ENGINE__MAX_LORA_RANK": "8",
        "TX_LOG_LEVEL": "warning",
    }
    server = subprocess.Popen([sys.executable, "-m", "tx_server"], env=env)
    sdk = None
    try:
        _wait_healthy(url, server)
        sdk = subprocess.Popen(
            [sys.executable, "-c", SDK_ACROSS_KILL, url, API_KEY, BASE],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert sdk.stdin is not None
        assert sdk.stdout is not None
        saved = json.loads(sdk.stdout.readline())["saved"]
        (worker,) = _worker_pids(server.pid)
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not [p for p in _worker_pids(server.pid) if p != worker]:
            assert time.monotonic() < deadline, "the worker was not restarted"
            time.sleep(0.2)
        sdk.stdin.write("go\n")
        sdk.stdin.flush()
        after = json.loads(sdk.stdout.readline())
        assert sdk.wait(timeout=120) == 0
        np.testing.assert_allclose(after["after"], saved, rtol=0, atol=1e-6)
        assert after["loss"] > 0
    finally:
        if sdk is not None and sdk.poll() is None:
            sdk.kill()
        server.terminate()
        server.wait(timeout=60)
