"""Two tenants' concurrent forward_backward calls become one engine call (issue 5, item 9).

Two official-SDK clients with different API keys train their own adapters against one live
server. While the worker is busy with a sampling request, both submit a forward_backward; the
worker's next claim then holds both, and its log line for the engine call names both models.
The fused results must equal what each tenant gets alone (fusion is invisible to clients).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import numpy as np
import pytest
import tinker
from tinker import types

from tx_server.settings import EngineSettings
from tx_server.testing import API_KEY, RunningServer, run_hub_model_server

BASE = "Qwen/Qwen3-8B"
OTHER_KEY = "tml-tx-server-tests-key-0002"
TIMEOUT = 120


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    engine = EngineSettings(max_lora_rank=8, max_lora_adapters=4, max_seq_len=128)
    root = tmp_path_factory.mktemp("fusion")
    with run_hub_model_server(root, base_models=[BASE], engine=engine) as server:
        yield server


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


def test_two_tenants_forward_backward_share_one_engine_call(
    live: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    clients = [
        tinker.ServiceClient(base_url=live.url, api_key=key)
        .create_lora_training_client(BASE, rank=4, seed=i)
        .result(timeout=TIMEOUT)
        for i, key in enumerate((API_KEY, OTHER_KEY))
    ]
    alone = [
        tc.forward([_datum(i)], "cross_entropy").result(timeout=TIMEOUT)
        for i, tc in enumerate(clients)
    ]
    blocker = clients[0].save_weights_and_get_sampling_client().result(timeout=TIMEOUT)
    params = types.SamplingParams(max_tokens=48, temperature=1.0, seed=0, stop=[])
    prompt = types.ModelInput.from_ints([5, 6, 7])
    caplog.set_level(logging.INFO, logger="tx_server.worker.executor")
    fused = []
    for _ in range(3):  # each round: both submit while the worker samples
        busy = blocker.sample(prompt, num_samples=8, sampling_params=params)
        results: list[types.ForwardBackwardOutput | None] = [None, None]
        start = threading.Barrier(2)

        def submit(
            i: int,
            out: list[types.ForwardBackwardOutput | None] = results,
            start: threading.Barrier = start,
        ) -> None:
            start.wait()
            out[i] = clients[i].forward_backward([_datum(i)], "cross_entropy").result(TIMEOUT)

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        busy.result(timeout=TIMEOUT)
        for got, want in zip(results, alone, strict=True):
            assert got is not None
            np.testing.assert_allclose(
                got.loss_fn_outputs[0]["logprobs"].data,
                want.loss_fn_outputs[0]["logprobs"].data,
                rtol=1e-5,
                atol=1e-6,
            )
        fused = _fused_models(caplog.records)
        if max(fused, default=0) >= 2:
            break
    assert max(fused, default=0) >= 2, f"models per forward_backward engine call: {fused}"
