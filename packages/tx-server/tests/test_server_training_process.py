"""``python -m tx_server`` runs the API *and* a supervised worker process; the SDK trains on it.

The SDK runs in a second subprocess with ``HF_HOME``/``HF_HUB_OFFLINE=1`` set before anything
imports transformers, so ``get_tokenizer()`` resolves ``Qwen/Qwen3-8B`` from the private cache.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tx_server.testing import API_KEY

BASE = "Qwen/Qwen3-8B"

SDK_SCRIPT = """
import json, sys, tinker
from tinker import types
sc = tinker.ServiceClient(base_url=sys.argv[1], api_key=sys.argv[2])
tc = sc.create_lora_training_client(sys.argv[3], rank=4, seed=0).result(timeout=120)
tok = tc.get_tokenizer()
ids = tok.encode("hello world hello")
datum = types.Datum(
    model_input=types.ModelInput.from_ints(ids[:-1]),
    loss_fn_inputs={"target_tokens": types.TensorData(data=ids[1:], dtype="int64")},
)
out = tc.forward_backward([datum], "cross_entropy").result(timeout=120)
step = tc.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=120)
print(json.dumps({"model_id": tc.model_id, "ids": ids, "loss": out.metrics["loss:sum"],
                  "n": len(out.loss_fn_outputs[0]["logprobs"].data),
                  "decoded": tok.decode(ids), "step": (step.metrics or {}).get("step")}))
sc.holder.close()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, "python -m tx_server exited"
        try:
            if httpx.get(f"{url}/api/v1/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise TimeoutError("python -m tx_server did not become healthy")


def _worker_pids(server_pid: int) -> list[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=,args=", "--ppid", str(server_pid)], capture_output=True, text=True
    )
    return [int(line.split()[0]) for line in out.stdout.splitlines() if "tx_server.worker" in line]


def _run_sdk(url: str, env: dict[str, str]) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", SDK_SCRIPT, url, API_KEY, BASE],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.slow
def test_python_m_tx_server_trains_with_a_supervised_worker(tmp_path: Path) -> None:
    from tx_engine.testing import install_hub_aliases

    hf_home = tmp_path / "hf"
    install_hub_aliases(hf_home)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
        "TX_PORT": str(port),
        "TX_DATABASE_URL": f"sqlite:///{tmp_path / 'tx.db'}",
        "TX_CHECKPOINT_ROOT": str(tmp_path / "ckpt"),
        "TX_BASE_MODELS": json.dumps([BASE]),
        "TX_ENGINE__MAX_LORA_RANK": "8",
        "TX_LOG_LEVEL": "warning",
    }
    proc = subprocess.Popen([sys.executable, "-m", "tx_server"], env=env)
    try:
        _wait_healthy(url, proc)
        first = _run_sdk(url, env)
        assert str(first["model_id"]).endswith(":train:0")
        ids = first["ids"]
        assert isinstance(ids, list)
        assert first["n"] == len(ids) - 1
        assert first["decoded"] == "hello world hello"
        assert float(first["loss"]) > 0  # type: ignore[arg-type]
        assert first["step"] == 1.0
        (worker,) = _worker_pids(proc.pid)
        os.kill(worker, signal.SIGKILL)  # the supervisor restarts it; the API stays up
        deadline = time.monotonic() + 30
        while not [p for p in _worker_pids(proc.pid) if p != worker]:
            assert time.monotonic() < deadline, "the worker was not restarted"
            time.sleep(0.2)
        workers = _worker_pids(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in workers):  # stopped by the server's shutdown, not orphaned
        assert time.monotonic() < deadline, f"worker {workers} outlived the server"
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
