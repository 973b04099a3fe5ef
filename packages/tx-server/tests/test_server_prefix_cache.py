"""A conversation's next turn, sampled through the SDK, continues the kept turn before it.

Live test: the unmodified tinker SDK 0.38.0 against uvicorn on 127.0.0.1 and the worker in a
thread, serving the kit's tiny Qwen3 as ``Qwen/Qwen3-8B`` with the default prefix cache. The
second turn's prompt is the first turn's prompt, its sample and three new tokens: the worker
must log that it reused the kept sequence, and the second turn's logprobs must still be the
model's (``compute_logprobs`` of the whole conversation, which prefills it from scratch).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import tinker
from tinker import types

from tx_server.settings import EngineSettings
from tx_server.testing import RunningServer, run_hub_model_server

BASE = "Qwen/Qwen3-8B"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    engine = EngineSettings(
        max_lora_rank=8, max_lora_adapters=2, max_seq_len=256, sample_tokens_per_batch=2048
    )
    with run_hub_model_server(
        tmp_path_factory.mktemp("prefix-cache"), base_models=[BASE], engine=engine
    ) as server:
        yield server


def test_a_conversations_next_turn_continues_the_kept_turn(
    live: RunningServer,
    sdk_service: Callable[[RunningServer], tinker.ServiceClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    sampler = sdk_service(live).create_sampling_client(base_model=BASE).result(timeout=120)
    caplog.set_level(logging.INFO, logger="tx_server.worker.sampling")
    prompt = list(range(100, 140))
    first = sampler.sample(
        types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=20, seed=1, stop=[])
    ).result(timeout=120)
    follow = prompt + list(first.sequences[0].tokens) + [7, 8, 9]
    assert not any("prefix cache" in r.getMessage() for r in caplog.records)
    second = sampler.sample(
        types.ModelInput.from_ints(follow), 1, types.SamplingParams(max_tokens=12, seed=2, stop=[])
    ).result(timeout=120)
    reuse = [r.getMessage() for r in caplog.records if "prefix cache" in r.getMessage()]
    assert reuse == ["prefix cache: 1 prompts continued kept sequences, 48 tokens reused"]
    # 40 + 19 kept tokens (all sampled tokens but the last): the 48-token context bucket.
    tokens = list(second.sequences[0].tokens)
    whole = sampler.compute_logprobs(types.ModelInput.from_ints(follow + tokens)).result(
        timeout=120
    )
    np.testing.assert_allclose(
        second.sequences[0].logprobs, np.array(whole[len(follow) :], np.float64), atol=1e-5
    )
