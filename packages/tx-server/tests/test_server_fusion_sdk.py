"""Two tenants' concurrent forward_backward calls become one engine call (issue 5, item 9).

Two official-SDK clients with different API keys train their own adapters against one live
API. Both submit a forward_backward (then an optim_step) while no worker runs (as when the
worker is busy), so the next worker's first claim holds both, and its log line for the engine
call names both models — deterministic, whatever the machine's speed. The fused results must
equal what each tenant gets alone (fusion is invisible to clients).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select
from tinker import types

from tx_server.db.database import Database
from tx_server.db.models import FutureRow, FutureStatus
from tx_server.settings import EngineSettings
from tx_server.testing import API_KEY, RunningServer, make_settings, offline_hub, run_server
from tx_server.worker.loop import worker_thread

BASE = "Qwen/Qwen3-8B"
OTHER_KEY = "tml-tx-server-tests-key-0002"
TIMEOUT = 120


@pytest.fixture
def api(tmp_path: Path) -> Iterator[RunningServer]:
    """The API alone (workers are started by the test), the tiny model served as ``BASE``."""
    engine = EngineSettings(max_lora_rank=8, max_lora_adapters=4, max_seq_len=128)
    settings = make_settings(tmp_path, base_models=[BASE], engine=engine, long_poll_seconds=20.0)
    with offline_hub(tmp_path / "hf"), run_server(settings) as server:
        yield server


def _pending(server: RunningServer) -> int:
    db = Database(server.settings.database_url)
    try:
        with db.read() as session:
            return len(
                session.scalars(
                    select(FutureRow.id).where(FutureRow.status == FutureStatus.PENDING)
                ).all()
            )
    finally:
        db.dispose()


def _datum(offset: int) -> types.Datum:
    tokens = [(7 * i + offset) % 200 + 3 for i in range(12)]
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": types.TensorData(data=tokens[1:], dtype="int64")},
    )


def _fused_models(records: list[logging.LogRecord]) -> list[int]:
    """Number of models in each forward_backward engine call the worker logged."""
    return [
        int(r.args[2])  # type: ignore[index]
        for r in records
        if r.msg.startswith("one %s engine call") and r.args[0] == "forward_backward"  # type: ignore[index]
    ]


def _fused_steps(records: list[logging.LogRecord]) -> list[int]:
    """Number of models in each optim_step engine call the worker logged."""
    return [
        int(r.args[0])  # type: ignore[index]
        for r in records
        if r.msg.startswith("one optim_step engine call")
    ]


def _wait_pending(server: RunningServer, n: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while _pending(server) < n:  # the SDK submits asynchronously
        assert time.monotonic() < deadline, f"{n} requests were never submitted"
        time.sleep(0.05)


def test_two_tenants_forward_backward_share_one_engine_call(
    api: RunningServer, caplog: pytest.LogCaptureFixture, open_service_client: Callable[..., Any]
) -> None:
    with worker_thread(api.settings):
        clients = [
            open_service_client(api.url, key)
            .create_lora_training_client(BASE, rank=4, seed=i)
            .result(timeout=TIMEOUT)
            for i, key in enumerate((API_KEY, OTHER_KEY))
        ]
        alone = [
            tc.forward([_datum(i)], "cross_entropy").result(timeout=TIMEOUT)
            for i, tc in enumerate(clients)
        ]
    futures = [tc.forward_backward([_datum(i)], "cross_entropy") for i, tc in enumerate(clients)]
    _wait_pending(api, 2)
    caplog.set_level(logging.INFO, logger="tx_server.worker")
    with worker_thread(api.settings):
        results = [f.result(timeout=TIMEOUT) for f in futures]
    assert _fused_models(caplog.records) == [2]
    for got, want in zip(results, alone, strict=True):
        np.testing.assert_allclose(
            got.loss_fn_outputs[0]["logprobs"].data,
            want.loss_fn_outputs[0]["logprobs"].data,
            rtol=1e-5,
            atol=1e-6,
        )

    # Both tenants' optimizer steps: one engine call, the same update as stepping alone.
    adam = types.AdamParams(learning_rate=5e-2)
    steps = [tc.optim_step(adam) for tc in clients]
    _wait_pending(api, 2)
    with worker_thread(api.settings):
        for f in steps:
            f.result(timeout=TIMEOUT)
        assert _fused_steps(caplog.records) == [2]
        stepped = [tc.forward([_datum(i)], "cross_entropy") for i, tc in enumerate(clients)]
        service = open_service_client(api.url, API_KEY)
        for i, got in enumerate(stepped):
            ref = service.create_lora_training_client(BASE, rank=4, seed=i).result(TIMEOUT)
            ref.forward_backward([_datum(i)], "cross_entropy").result(TIMEOUT)
            ref.optim_step(adam).result(TIMEOUT)
            want = ref.forward([_datum(i)], "cross_entropy").result(TIMEOUT)
            np.testing.assert_allclose(
                got.result(TIMEOUT).loss_fn_outputs[0]["logprobs"].data,
                want.loss_fn_outputs[0]["logprobs"].data,
                rtol=1e-5,
                atol=1e-6,
            )
