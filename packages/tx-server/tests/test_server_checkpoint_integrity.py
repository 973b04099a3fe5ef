"""A run's checkpoints stay what they say they are: loads must fit the run, names cannot take
an unnamed snapshot's place, and a deleted checkpoint's path never reads another one's files.

Official SDK 0.38.0 against a live API + worker thread, the kit's tiny Qwen3 as ``Qwen/Qwen3-8B``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest
import tinker
from tinker import types

from tx_server.settings import EngineSettings
from tx_server.testing import API_KEY, RunningServer, run_hub_model_server

BASE = "Qwen/Qwen3-8B"
TOKENS = [5, 17, 42, 9, 101, 77, 3, 250, 64, 12, 33, 8]
PROMPT = types.ModelInput.from_ints(TOKENS[:6])
SCORE = types.SamplingParams(max_tokens=1, temperature=0.0)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    engine = EngineSettings(max_lora_rank=16, max_lora_adapters=8, max_seq_len=64)
    with run_hub_model_server(
        tmp_path_factory.mktemp("integrity"), base_models=[BASE], engine=engine
    ) as server:
        yield server


def _trained(sc: tinker.ServiceClient, rank: int, seed: int) -> tinker.TrainingClient:
    tc = sc.create_lora_training_client(BASE, rank=rank, seed=seed).result(timeout=120)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs={"target_tokens": types.TensorData(data=TOKENS[1:], dtype="int64")},
    )
    tc.forward_backward([datum], "cross_entropy").result(timeout=120)
    tc.optim_step(types.AdamParams(learning_rate=5e-2)).result(timeout=120)
    return tc


def _prompt_logprobs(sampler: tinker.SamplingClient) -> np.ndarray:
    out = sampler.sample(PROMPT, 1, SCORE, include_prompt_logprobs=True).result(timeout=120)
    return np.asarray(out.prompt_logprobs[1:], np.float64)


@pytest.mark.filterwarnings("ignore:DEPRECATED. TrainingClient.load_state:FutureWarning")
def test_a_checkpoint_of_another_rank_is_not_loaded_into_a_run(
    live: RunningServer, sdk_service: Callable[[RunningServer], tinker.ServiceClient]
) -> None:
    sc = sdk_service(live)
    rank8 = _trained(sc, 8, seed=1).save_state("r8").result(timeout=120).path
    rank4 = _trained(sc, 4, seed=2)
    for load in (rank4.load_state, rank4.load_state_with_optimizer):
        with pytest.raises(tinker.APIStatusError) as refused:
            load(rank8).result(timeout=120)
        assert refused.value.status_code == 400
        assert "rank 8 (the run has 4)" in str(refused.value)
    rest = tinker.RestClient(base_url=live.url, api_key=API_KEY)
    assert rest.get_training_run(rank4.model_id).result(timeout=60).lora_rank == 4
    # A checkpoint of the run's own shape still loads, and a new run takes any rank.
    own = rank4.save_state("r4").result(timeout=120).path
    rank4.load_state(own).result(timeout=120)
    restored = sc.create_training_client_from_state(rank8).result(timeout=120)
    assert rest.get_training_run(restored.model_id).result(timeout=60).lora_rank == 8


def test_unnamed_snapshots_cannot_be_overwritten_or_impersonated(
    live: RunningServer, sdk_service: Callable[[RunningServer], tinker.ServiceClient]
) -> None:
    sc = sdk_service(live)
    tc = _trained(sc, 8, seed=3)
    snapshot = tc.save_weights_and_get_sampling_client().result(timeout=120)  # ephemeral-0
    before = _prompt_logprobs(snapshot)
    with pytest.raises(tinker.APIStatusError) as reserved:
        tc.save_weights_for_sampler("ephemeral-0").result(timeout=120)
    assert reserved.value.status_code == 400
    assert "reserved" in str(reserved.value)
    np.testing.assert_array_equal(_prompt_logprobs(snapshot), before)


def test_a_deleted_checkpoint_is_gone_for_its_samplers(
    live: RunningServer, sdk_service: Callable[[RunningServer], tinker.ServiceClient]
) -> None:
    """A sampler of ``weights/x`` must not fall back to ``sampler_weights/x`` (or any other
    files) once ``weights/x`` is deleted, and the error names the path, not a server file."""
    sc = sdk_service(live)
    tc = _trained(sc, 8, seed=4)
    path = tc.save_state("x").result(timeout=120).path
    sampler = sc.create_sampling_client(model_path=path).result(timeout=120)
    _prompt_logprobs(sampler)
    tc.save_weights_for_sampler("x").result(timeout=120)
    tinker.RestClient(base_url=live.url, api_key=API_KEY).delete_checkpoint_from_tinker_path(
        path
    ).result(timeout=60)
    with pytest.raises(tinker.RequestFailedError) as gone:
        _prompt_logprobs(sampler)
    assert gone.value.category == types.RequestErrorCategory.User
    assert f"checkpoint {path!r} no longer exists" in gone.value.message
    assert str(live.settings.checkpoint_root) not in gone.value.message
