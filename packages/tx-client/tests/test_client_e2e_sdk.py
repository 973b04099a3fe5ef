"""End to end: the same training script through tx-client and through the official SDK, against
one real tx-server, must give the same numbers (issue tx-client item 5).

It activates by itself once the server serves ``/api/v1/create_model`` (the training endpoints
arrive in a later server session); until then it skips and says why.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tinker

import tx_client
from tx_server.testing import RunningServer, make_settings, run_server

API_KEY = "tml-tx-client-tests-0001"


@pytest.fixture
def training_server(tmp_path: Path) -> Iterator[RunningServer]:
    with run_server(make_settings(tmp_path)) as server:
        probe = httpx.post(
            f"{server.url}/api/v1/create_model", json={}, headers={"X-API-Key": API_KEY}
        )
        if probe.status_code == 404:
            pytest.skip("tx-server does not serve /api/v1/create_model yet (training endpoints)")
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
        tc = sc.create_lora_training_client(base_model, rank=4, seed=0)
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
    base_model = training_server.settings.base_models[0]
    ours = _script(tx_client, training_server.url, base_model)
    theirs = _script(tinker, training_server.url, base_model)
    np.testing.assert_allclose(ours["before"], theirs["before"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours["after"], theirs["after"], rtol=1e-4, atol=1e-5)
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
    assert ours["path_suffix"] == theirs["path_suffix"] == ["weights", "e2e"]
    assert not np.allclose(ours["before"], ours["after"])  # the step changed the model
