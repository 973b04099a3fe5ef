"""Process boundaries: the API imports no jax; ``python -m tx_server`` serves a worker's results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tx_server.auth import tenant_of_key
from tx_server.db.database import Database
from tx_server.futures import FutureStore, RequestType, Submission
from tx_server.testing import API_KEY
from tx_server.wake import wake_bus_for
from tx_server.work_queue import WorkQueue


def test_importing_the_app_imports_neither_jax_nor_the_engine() -> None:
    code = (
        "import sys, tx_server.app, tx_server.serve, tx_server.work_queue\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'tx_engine', 'flax')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _wait_healthy(url: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "server exited"
        try:
            if httpx.get(f"{url}/api/v1/healthz", timeout=1).json() == {"status": "ok"}:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise TimeoutError("python -m tx_server did not become healthy")


def test_python_m_tx_server_is_woken_by_another_process(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    db_url = f"sqlite:///{tmp_path / 'tx.db'}"
    env = {
        **os.environ,
        "TX_PORT": str(port),
        "TX_DATABASE_URL": db_url,
        "TX_FUTURE_RECHECK_SECONDS": "10",
        "TX_LOG_LEVEL": "warning",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "tx_server"], env=env, text=True, stderr=subprocess.PIPE
    )
    try:
        _wait_healthy(url, proc)
        db = Database(db_url)  # this test process plays the worker
        request_id = FutureStore(db, wake_bus_for(db)).submit(
            tenant_of_key(API_KEY), Submission(RequestType.SAMPLE, b"{}")
        )
        queue = WorkQueue(db)
        done_at: list[float] = []

        def finish() -> None:
            time.sleep(0.5)
            queue.complete(request_id, json.dumps({"ok": 1}).encode(), "application/json")
            done_at.append(time.perf_counter())

        threading.Thread(target=finish).start()
        response = httpx.post(
            f"{url}/api/v1/retrieve_future",
            json={"request_id": request_id},
            headers={"X-API-Key": API_KEY},
            timeout=30,
        )
        latency = time.perf_counter() - done_at[0]
        assert response.json() == {"ok": 1}
        assert latency < 2.0, latency  # the re-check is 10 s: only the wake-up is this fast
        db.dispose()
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    assert not list((tmp_path / "tx.db-wake").glob("tx_futures.*"))  # unregistered on exit


@pytest.mark.parametrize(
    ("model", "reason"),
    [("tx-tests/no-such-model", "neither a directory nor obtainable"), ("/no/such/dir", "no such")],
)
def test_python_m_tx_server_refuses_to_start_without_its_base_model(
    tmp_path: Path, model: str, reason: str
) -> None:
    """A base model that is not a directory and not to be had from the hub (offline here, not
    cached) stops the start with one line naming it: it used to serve, healthy, and fail
    every request for that model."""
    env = {
        **os.environ,
        "TX_BASE_MODELS": json.dumps([model]),
        "TX_DATABASE_URL": f"sqlite:///{tmp_path / 'tx.db'}",
        "TX_PORT": "1",  # never reached: nothing may bind
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "tx_server"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stderr
    assert model in done.stderr, done.stderr
    assert reason in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "tx.db").exists()  # stopped before anything was set up


def test_hub_named_base_models_are_found_in_the_cache_offline(tmp_path: Path) -> None:
    """The start-up fetch finds a hub-named model in the cache offline (as the worker will)."""
    from tx_engine.testing import install_hub_aliases

    install_hub_aliases(tmp_path / "hf")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    code = "from tx_server.hub import fetch_base_models; fetch_base_models(['Qwen/Qwen3-8B'])"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
