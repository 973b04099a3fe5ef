"""End to end: the same training script through tx-client and through the official SDK, against
one real tx-server (API + worker), must give the same numbers (issue tx-client item 5).

The served model is the tx-engine kit's tiny Qwen3 under the hub name ``Qwen/Qwen3-8B``
(installed into a private Hugging Face cache); the worker runs in a thread of this process.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tinker

import tx_client
from tx_server.settings import EngineSettings
from tx_server.testing import RunningServer, run_hub_model_server

API_KEY = "tml-tx-client-tests-0001"
BASE = "Qwen/Qwen3-8B"


@pytest.fixture
def training_server(tmp_path: Path) -> Iterator[RunningServer]:
    engine = EngineSettings(max_lora_rank=8, max_lora_adapters=4, max_seq_len=64)
    with run_hub_model_server(tmp_path, base_models=[BASE], engine=engine) as server:
        yield server


def _script(sdk: Any, url: str, base_model: str) -> dict[str, Any]:
    """A small SFT loop written against the ``tinker`` API; ``sdk`` is tinker or tx_client."""
    types = sdk.types
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3, 4, 5]),
        loss_fn_inputs={
            "target_tokens": np.array([2, 3, 4, 5, 6], np.int64),
            "weights": np.array([0, 1, 1, 1, 1], np.float32),
        },
    )
    with sdk.ServiceClient(base_url=url, api_key=API_KEY) as sc:
        # SDK 0.38 spelling: client creation returns a future; tx-client must accept it too.
        tc = sc.create_lora_training_client(base_model, rank=4, seed=0).result()
        before = tc.forward([datum], "cross_entropy").result()
        fb = tc.forward_backward([datum, datum], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        after = tc.forward([datum], "cross_entropy").result()
        path = tc.save_state("e2e").result().path
    return {
        "before": np.asarray(before.loss_fn_outputs[0]["logprobs"].data),
        "after": np.asarray(after.loss_fn_outputs[0]["logprobs"].data),
        "loss": fb.metrics["loss:sum"],
        "path_suffix": path.rsplit("/", 2)[-2:],
    }


def test_same_script_same_numbers_as_official_sdk(training_server: RunningServer) -> None:
    base_model = BASE
    ours = _script(tx_client, training_server.url, base_model)
    theirs = _script(tinker, training_server.url, base_model)
    np.testing.assert_allclose(ours["before"], theirs["before"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours["after"], theirs["after"], rtol=1e-4, atol=1e-5)
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
    assert ours["path_suffix"] == theirs["path_suffix"] == ["weights", "e2e"]
    assert not np.allclose(ours["before"], ours["after"])  # the step changed the model


def test_created_clients_also_work_as_their_creation_futures(
    training_server: RunningServer,
) -> None:
    import asyncio

    with tx_client.ServiceClient(base_url=training_server.url, api_key=API_KEY) as sc:
        tc = sc.create_lora_training_client(BASE, rank=4, seed=0)
        assert tc.result() is tc
        assert tc.result(timeout=1) is tc
        assert asyncio.run(_await(tc)) is tc


async def _await(obj: Any) -> Any:
    return await obj
