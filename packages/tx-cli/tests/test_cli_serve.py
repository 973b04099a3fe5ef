"""`tx serve` starts the real API + worker process and the official SDK can train against it;
the worker keeps its compiled programs in ``TX_COMPILATION_CACHE_DIR``. Its flags win over
``TX_*`` variables, which apply where no flag is given; a bad value is a usage error naming its
setting, before anything starts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from tx_cli.commands.serve import resolve_settings
from tx_cli.main import app

API_KEY = "tml-cli-serve-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen[str], deadline_s: float = 120) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            if httpx.get(f"{url}/api/v1/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError("tx serve did not become healthy")


def test_tx_serve_trains_through_the_official_sdk(
    tmp_path: Path, open_service_client: Callable[..., Any]
) -> None:
    from tinker import types

    from tx_engine.testing import build_model

    model_dir = build_model("tiny-qwen3", tmp_path / "models" / "tiny-qwen3")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cache = tmp_path / "jax-cache"
    env = {**os.environ, "TX_LONG_POLL_SECONDS": "5", "TX_COMPILATION_CACHE_DIR": str(cache)}
    cmd = [
        *(sys.executable, "-c", "from tx_cli.main import app; app()"),
        *("serve", "--port", str(port), "--base-model", str(model_dir)),
        *("--database-url", f"sqlite:///{tmp_path / 'tx.db'}"),
        *("--checkpoint-root", str(tmp_path / "ckpt"), "--max-lora-rank", "8"),
        *("--sample-tokens-per-batch", "4096", "--prefix-cache-tokens", "1024"),
        *("--tokens-per-micro-batch", "1024", "--decode-chunk", "4"),
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        _wait_healthy(url, proc)
        caps = httpx.get(f"{url}/api/v1/get_server_capabilities", headers={"X-API-Key": API_KEY})
        assert [m["model_name"] for m in caps.json()["supported_models"]] == [str(model_dir)]
        sc = open_service_client(url, API_KEY)
        tc = sc.create_lora_training_client(str(model_dir), rank=8, seed=0).result(timeout=120)
        datum = types.Datum(
            model_input=types.ModelInput.from_ints([5, 17, 42, 9, 101]),
            loss_fn_inputs={"target_tokens": [17, 42, 9, 101, 7], "weights": [1.0] * 5},
        )
        losses = []
        for _ in range(4):
            out = tc.forward_backward([datum], "cross_entropy").result(timeout=120)
            tc.optim_step(types.AdamParams(learning_rate=2e-2)).result(timeout=120)
            losses.append(out.metrics["loss:sum"])
        assert losses[-1] < losses[0]
        assert any(cache.iterdir()), "the worker wrote no compiled program to its cache"
        # Finished while the server still runs; the fixture closes it if the test fails.
        sc.close("success").result(timeout=60)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            output = proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:  # pragma: no cover - diagnostic path
            proc.kill()
            pytest.fail("tx serve did not stop on SIGINT")
    # The flags reached the worker's engine (it logs what it built).
    assert "1024 tokens per micro-batch; sampling: 4096 KV slots per batch" in output
    assert "prefix cache 1024 token slots, 4 decode steps per dispatch" in output


def test_engine_flags_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TX_ENGINE__SAMPLE_TOKENS_PER_BATCH", "4096")
    monkeypatch.setenv("TX_ENGINE__SAMPLE_PREFIX_CACHE_TOKENS", "1024")
    monkeypatch.setenv("TX_BASE_MODELS", '["Qwen/Qwen3-8B"]')
    flags = {"sample_prefix_cache_tokens": 0, "dtype": "bfloat16", "mesh_ep": 2}
    engine = resolve_settings({}, {**flags, "tokens_per_micro_batch": 512}).engine
    assert engine.sample_tokens_per_batch == 4096  # from the environment: no flag
    assert (engine.sample_prefix_cache_tokens, engine.dtype, engine.mesh_ep) == (0, "bfloat16", 2)
    assert engine.tokens_per_micro_batch == 512


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--sample-tokens-per-batch", "0"),
        ("--prefix-cache-tokens", "-1"),
        ("--decode-chunk", "0"),
        ("--dtype", "float8"),
        ("--ep-size", "0"),
        ("--port", "70000"),
    ],
)
def test_a_bad_flag_is_a_usage_error_naming_it(flag: str, value: str) -> None:
    result = CliRunner().invoke(app, ["serve", flag, value, "--base-model", "Qwen/Qwen3-8B"])
    assert result.exit_code == 2
    assert f"Invalid value: {flag}: " in result.output


def test_a_bad_variable_is_a_usage_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TX_ENGINE__MESH_EP", "0")
    result = CliRunner().invoke(app, ["serve", "--base-model", "Qwen/Qwen3-8B"])
    assert result.exit_code == 2
    assert "Invalid value: TX_ENGINE__MESH_EP: " in result.output
