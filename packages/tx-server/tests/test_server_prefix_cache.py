"""Prompts sampled through the SDK reuse kept prefixes: a conversation's next turn continues the
kept turn before it, and requests sharing a system prompt prefill it once.

Live test: the unmodified tinker SDK 0.38.0 against uvicorn on 127.0.0.1 and the worker in a
thread, serving the kit's tiny Qwen3 as ``Qwen/Qwen3-8B`` with the default prefix cache. The
second turn's prompt is the first turn's prompt, its sample and three new tokens: the worker
must log that it reused the kept sequence, and the second turn's logprobs must still be the
model's (``compute_logprobs`` of the whole conversation, which prefills it from scratch).
Requests sent together whose prompts share a prefix: all but the first reuse it, however the
worker happens to receive them (in one claim, in several, or joining a running batch).
"""

from __future__ import annotations

import logging
import re
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


@pytest.fixture
def sampler(
    live: RunningServer,
    sdk_service: Callable[[RunningServer], tinker.ServiceClient],
    caplog: pytest.LogCaptureFixture,
) -> tinker.SamplingClient:
    """A sampling client of the base model, with the worker's sampling log captured."""
    caplog.set_level(logging.INFO, logger="tx_server.worker.sampling")
    return sdk_service(live).create_sampling_client(base_model=BASE).result(timeout=120)


def _reused(caplog: pytest.LogCaptureFixture) -> tuple[int, int]:
    """Prompts and tokens the worker logged as reused, summed over its log lines."""
    found = [
        re.fullmatch(r"prefix cache: (\d+) prompts reused kept prefixes, (\d+) tokens in all", m)
        for m in (r.getMessage() for r in caplog.records)
        if m.startswith("prefix cache")
    ]
    assert all(found)
    return sum(int(f[1]) for f in found if f), sum(int(f[2]) for f in found if f)


def _assert_the_models_logprobs(
    sampler: tinker.SamplingClient, prompt: list[int], sampled: types.SampleResponse
) -> None:
    """The sample's logprobs equal ``compute_logprobs`` of the whole sequence, which prefills
    it from scratch."""
    tokens = list(sampled.sequences[0].tokens)
    whole = sampler.compute_logprobs(types.ModelInput.from_ints(prompt + tokens)).result(
        timeout=120
    )
    np.testing.assert_allclose(
        sampled.sequences[0].logprobs, np.array(whole[len(prompt) :], np.float64), atol=1e-5
    )


def test_a_conversations_next_turn_continues_the_kept_turn(
    sampler: tinker.SamplingClient, caplog: pytest.LogCaptureFixture
) -> None:
    prompt = list(range(100, 140))
    first = sampler.sample(
        types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=20, seed=1, stop=[])
    ).result(timeout=120)
    follow = prompt + list(first.sequences[0].tokens) + [7, 8, 9]
    assert not any("prefix cache" in r.getMessage() for r in caplog.records)
    second = sampler.sample(
        types.ModelInput.from_ints(follow), 1, types.SamplingParams(max_tokens=12, seed=2, stop=[])
    ).result(timeout=120)
    assert _reused(caplog) == (1, 48)
    # 40 + 19 kept tokens (all sampled tokens but the last): the 48-token context bucket.
    _assert_the_models_logprobs(sampler, follow, second)


def test_requests_sharing_a_system_prompt_prefill_it_once(
    sampler: tinker.SamplingClient, caplog: pytest.LogCaptureFixture
) -> None:
    system = list(range(300, 348))
    prompts = [system + [400 + 10 * i + j for j in range(8)] for i in range(3)]
    futures = [
        sampler.sample(
            types.ModelInput.from_ints(p), 1, types.SamplingParams(max_tokens=8, seed=i, stop=[])
        )
        for i, p in enumerate(prompts)
    ]
    results = [f.result(timeout=120) for f in futures]
    assert _reused(caplog) == (2, 2 * 48)
    for prompt, result in zip(prompts, results, strict=True):
        _assert_the_models_logprobs(sampler, prompt, result)
