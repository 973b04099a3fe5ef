"""Sampling through the unmodified tinker SDK 0.38.0 against a live API + worker thread.

Same set-up as ``test_server_training_sdk.py``: the tx-engine kit's tiny Qwen3 served as
``Qwen/Qwen3-8B`` from a private offline Hugging Face cache, uvicorn on 127.0.0.1, SQLite, the
worker in a thread. The oracle for sampled logprobs is the trainer's own ``forward`` pass.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import tinker
from sqlalchemy import select
from tinker import types

from tx_server.db.database import Database
from tx_server.db.models import FutureRow
from tx_server.settings import EngineSettings
from tx_server.testing import RunningServer, run_hub_model_server
from tx_server.worker.engines import resolve_model_dir

BASE = "Qwen/Qwen3-8B"
TOKENS = [5, 17, 42, 9, 101, 77, 3, 250, 64, 12, 33, 8]
PROMPT = types.ModelInput.from_ints(TOKENS[:3])
GREEDY = types.SamplingParams(max_tokens=len(TOKENS) - 3, temperature=0.0, stop=[])


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    engine = EngineSettings(
        max_lora_rank=16, max_lora_adapters=12, max_seq_len=64, sample_tokens_per_batch=512
    )
    root = tmp_path_factory.mktemp("sampling")
    # A wide gather window, so the group test below does not depend on this machine's speed.
    with run_hub_model_server(
        root, base_models=[BASE], engine=engine, sample_gather_seconds=0.1
    ) as server:
        yield server


def _datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=tokens[1:], dtype="int64"),
            "weights": types.TensorData(data=[1.0] * (len(tokens) - 1), dtype="float32"),
        },
    )


def _forward_logprobs(tc: tinker.TrainingClient, tokens: list[int]) -> np.ndarray:
    """Logprob of tokens[i] given tokens[:i], for i >= 1 (the trainer's forward pass)."""
    out = tc.forward([_datum(tokens)], "cross_entropy").result(timeout=120)
    return np.asarray(out.loss_fn_outputs[0]["logprobs"].data, np.float64)


def _train(tc: tinker.TrainingClient, tokens: list[int], steps: int, lr: float = 2e-2) -> None:
    for _ in range(steps):
        tc.forward_backward([_datum(tokens)], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=lr)).result(timeout=120)


def _sample(
    client: tinker.SamplingClient, params: types.SamplingParams, n: int = 1
) -> types.SampleResponse:
    return client.sample(prompt=PROMPT, num_samples=n, sampling_params=params).result(timeout=120)


def test_snapshot_sampler_returns_wellformed_sequences(
    live: RunningServer, sdk_service: Callable[[RunningServer], tinker.ServiceClient]
) -> None:
    sc = sdk_service(live)
    tc = sc.create_lora_training_client(BASE, rank=8, seed=1).result(timeout=120)
    sampling = tc.save_weights_and_get_sampling_client().result(timeout=120)
    params = types.SamplingParams(max_tokens=8, temperature=0.0)
    resp = _sample(sampling, params, n=2)
    assert len(resp.sequences) == 2
    for seq in resp.sequences:
        assert seq.logprobs is not None
        assert len(seq.logprobs) == len(seq.tokens)
        assert seq.stop_reason in ("stop", "length")
        assert 1 <= len(seq.tokens) <= 8
        assert seq.stop_reason == "stop" or len(seq.tokens) == 8
        assert all(lp <= 0 for lp in seq.logprobs)
    assert resp.sequences[0].tokens == resp.sequences[1].tokens  # greedy
    ids = {seq.sequence_id for seq in resp.sequences}
    assert len(ids) == 2
    assert None not in ids


def test_memorised_sequence_is_sampled_and_snapshot_stays_frozen(
    live: RunningServer, sdk_service: Callable[[RunningServer], tinker.ServiceClient]
) -> None:
    sc = sdk_service(live)
    tc = sc.create_lora_training_client(BASE, rank=16, seed=2).result(timeout=120)
    for _ in range(6):  # until every target token has p > 0.6, so it is the argmax
        _train(tc, TOKENS, steps=10, lr=5e-3)
        if _forward_logprobs(tc, TOKENS).min() > np.log(0.6):
            break
    assert _forward_logprobs(tc, TOKENS).min() > np.log(0.6)
    snapshot = tc.save_weights_and_get_sampling_client().result(timeout=120)
    first = _sample(snapshot, GREEDY).sequences[0]
    assert first.tokens == TOKENS[3:]
    assert first.stop_reason == "length"
    named = tc.save_weights_for_sampler("memorised").result(timeout=120).path
    training = tc.save_state("memorised").result(timeout=120).path
    _train(tc, TOKENS[::-1], steps=10)  # training on: the snapshot must not move
    again = _sample(snapshot, GREEDY).sequences[0]
    assert again.tokens == first.tokens
    np.testing.assert_allclose(again.logprobs, first.logprobs, atol=1e-5)
    for path in (named, training):  # reopen the saved weights by path (GET samplers/{id})
        by_path = sc.create_sampling_client(model_path=path).result(timeout=120)
        assert by_path.get_base_model() == BASE
        assert _sample(by_path, GREEDY).sequences[0].tokens == TOKENS[3:]
    tc.save_weights_for_sampler("memorised").result(timeout=120)  # overwrite: new weights
    reopened = sc.create_sampling_client(model_path=named).result(timeout=120)
    params = types.SamplingParams(max_tokens=4, temperature=1.0, seed=5, stop=[])
    seq = _sample(reopened, params).sequences[0]
    expected = _forward_logprobs(tc, TOKENS[:3] + list(seq.tokens))[-4:]
    np.testing.assert_allclose(seq.logprobs, expected, atol=1e-4)


def test_sampled_and_prompt_logprobs_match_forward(
    live: RunningServer, sdk_service: Callable[[RunningServer], tinker.ServiceClient]
) -> None:
    sc = sdk_service(live)
    tc = sc.create_lora_training_client(BASE, rank=8, seed=3).result(timeout=120)
    _train(tc, TOKENS, steps=3, lr=1e-2)
    sampling = tc.save_weights_and_get_sampling_client().result(timeout=120)
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=11, stop=[])
    seq = _sample(sampling, params).sequences[0]
    full = TOKENS[:3] + list(seq.tokens)
    expected = _forward_logprobs(tc, full)[-len(seq.tokens) :]
    np.testing.assert_allclose(seq.logprobs, expected, atol=1e-4)
    again = _sample(sampling, params).sequences[0]
    assert again.tokens == seq.tokens  # same seed, same tokens
    scored = sampling.compute_logprobs(types.ModelInput.from_ints(TOKENS)).result(timeout=120)
    assert scored[0] is None
    assert len(scored) == len(TOKENS)
    reference = _forward_logprobs(tc, TOKENS)
    np.testing.assert_allclose(np.asarray(scored[1:], np.float64), reference, atol=1e-4)


def test_base_model_sampler_equals_fresh_adapter(
    live: RunningServer, sdk_service: Callable[[RunningServer], tinker.ServiceClient]
) -> None:
    sc = sdk_service(live)
    base = sc.create_sampling_client(base_model=BASE).result(timeout=120)
    assert base.get_base_model() == BASE
    fresh = sc.create_lora_training_client(BASE, rank=4, seed=4).result(timeout=120)
    params = types.SamplingParams(max_tokens=5, temperature=1.0, seed=3, stop=[])
    seq = _sample(base, params).sequences[0]
    assert len(seq.tokens) == 5
    # A new LoRA adapter starts with B = 0: it is the base model, scored by forward.
    expected = _forward_logprobs(fresh, TOKENS[:3] + list(seq.tokens))[-5:]
    np.testing.assert_allclose(seq.logprobs, expected, atol=1e-4)


def test_bad_sample_requests_fail_as_user_errors(
    live: RunningServer, sdk_service: Callable[[RunningServer], tinker.ServiceClient]
) -> None:
    sc = sdk_service(live)
    base = sc.create_sampling_client(base_model=BASE).result(timeout=120)
    vocab = json.loads((resolve_model_dir(BASE) / "config.json").read_text())["vocab_size"]
    cold = types.SamplingParams(max_tokens=4, temperature=-1.0)
    with pytest.raises(tinker.RequestFailedError) as bad_temp:
        _sample(base, cold)
    assert bad_temp.value.category == types.RequestErrorCategory.User
    assert "temperature" in bad_temp.value.message
    too_big = types.ModelInput.from_ints([1, int(vocab)])
    with pytest.raises(tinker.RequestFailedError) as bad_token:
        base.sample(prompt=too_big, num_samples=1, sampling_params=GREEDY).result(timeout=120)
    assert bad_token.value.category == types.RequestErrorCategory.User
    assert "prompt_tokens" in bad_token.value.message
    rows = types.TensorData(data=[1, 2, 3, 4, 5], dtype="int64", shape=[5, 1])  # prompt has 3
    future = base.sample(
        prompt=PROMPT, num_samples=1, sampling_params=GREEDY, target_prompt_logprobs=rows
    )
    with pytest.raises(tinker.RequestFailedError) as bad_targets:
        future.result(timeout=120)
    assert bad_targets.value.category == types.RequestErrorCategory.User
    assert "target_prompt_logprobs" in bad_targets.value.message
    for error in (bad_temp, bad_token, bad_targets):  # no index of the engine's batch
        assert "requests[" not in error.value.message, error.value.message
    assert len(_sample(base, GREEDY).sequences[0].tokens) == len(TOKENS) - 3  # still serving


def test_sampling_stays_inside_the_advertised_context_length(
    live: RunningServer, sdk_service: Callable[[RunningServer], tinker.ServiceClient]
) -> None:
    """max_seq_len (64 here) is the context length the server advertises: a longer prompt is
    refused as a user error, and no max_tokens fills up to it, not up to the KV budget (512)."""
    assert live.settings.engine.max_seq_len == 64  # what get_server_capabilities reports
    base = sdk_service(live).create_sampling_client(base_model=BASE).result(timeout=120)
    params = types.SamplingParams(temperature=1.0, seed=0, stop=[])
    out = base.sample(PROMPT, 1, params).result(timeout=120)
    assert len(out.sequences[0].tokens) == 64 - len(TOKENS[:3])
    long_prompt = types.ModelInput.from_ints([5] * 69)
    with pytest.raises(tinker.RequestFailedError) as refused:
        base.sample(long_prompt, 1, types.SamplingParams(max_tokens=1)).result(timeout=120)
    assert refused.value.category == types.RequestErrorCategory.User
    assert "64 tokens" in refused.value.message


def test_sample_and_prompt_scores_of_every_kind(
    live: RunningServer, sdk_service: Callable[[RunningServer], tinker.ServiceClient]
) -> None:
    """topk_sample_logprobs, target_prompt_logprobs (dense and CSR), prompt_alt_tokens_k and
    prompt_logprobs_last_n, each checked against the prompt logprobs of the same call."""
    sampler = sdk_service(live).create_sampling_client(base_model=BASE).result(timeout=120)
    prompt = types.ModelInput.from_ints(TOKENS[:8])
    n = len(TOKENS[:8])
    params = types.SamplingParams(max_tokens=5, temperature=1.0, seed=3, stop=[])
    dense_ids = [[TOKENS[i + 1], 7] for i in range(n - 1)]  # [actual next token, token 7]
    dense = types.TensorData(
        data=np.asarray(dense_ids).reshape(-1).tolist(), dtype="int64", shape=[n - 1, 2]
    )
    out = sampler.sample(
        prompt,
        2,
        params,
        include_prompt_logprobs=True,
        topk_sample_logprobs=3,
        target_prompt_logprobs=dense,
        prompt_alt_tokens_k=4,
    ).result(timeout=120)
    prompt_lp = np.asarray(out.prompt_logprobs[1:], np.float64)
    for seq in out.sequences:
        assert len(seq.topk_logprobs) == len(seq.tokens)
        for token, lp, row in zip(seq.tokens, seq.logprobs, seq.topk_logprobs, strict=True):
            assert 1 <= len(row) <= 3
            values = [v for _, v in row]
            assert values == sorted(values, reverse=True)
            assert values[0] >= lp - 1e-6
            if token in dict(row):
                assert dict(row)[token] == pytest.approx(lp, abs=1e-5)
    scores = np.asarray(out.target_prompt_logprobs.data, np.float64).reshape(n - 1, 2)
    np.testing.assert_allclose(scores[:, 0], prompt_lp, atol=1e-5)  # column 0 = actual tokens
    alt_tokens = np.asarray(out.prompt_alt_tokens.tokens.data).reshape(n - 1, 4)
    alt_lp = np.asarray(out.prompt_alt_tokens.logprobs.data).reshape(n - 1, 4)
    # The draws' logprobs (temperature 1) are what target scoring of the same ids gives.
    alt_ids = types.TensorData(
        data=alt_tokens.reshape(-1).tolist(), dtype="int64", shape=[n - 1, 4]
    )
    rescored = sampler.sample(prompt, 1, params, target_prompt_logprobs=alt_ids).result(timeout=120)
    scored = np.asarray(rescored.target_prompt_logprobs.data, np.float64).reshape(n - 1, 4)
    np.testing.assert_allclose(alt_lp, scored, atol=1e-5)

    # CSR: row i asks only for the actual next token; unlisted cells mean "not requested".
    sparse = types.TensorData(
        data=[TOKENS[i + 1] for i in range(n - 1)],
        dtype="int64",
        shape=[n - 1, 2],
        sparse_crow_indices=list(range(n)),
        sparse_col_indices=[i % 2 for i in range(n - 1)],
    )
    last = sampler.sample(
        prompt,
        1,
        params,
        include_prompt_logprobs=True,
        target_prompt_logprobs=sparse,
        prompt_logprobs_last_n=3,
    ).result(timeout=120)
    got = last.target_prompt_logprobs
    assert got.sparse_col_indices == sparse.sparse_col_indices
    np.testing.assert_allclose(np.asarray(got.data, np.float64), prompt_lp, atol=1e-5)
    assert last.prompt_logprobs[: n - 3] == [None] * (n - 3)
    np.testing.assert_allclose(np.asarray(last.prompt_logprobs[n - 3 :]), prompt_lp[-3:], atol=1e-5)


def test_a_short_request_is_answered_before_a_long_one_of_its_batch(
    live: RunningServer, sdk_service: Callable[[RunningServer], tinker.ServiceClient]
) -> None:
    """Two tenants' requests in one batch (one decode run): the short one's future completes
    when its own tokens are done, not when the long one's are."""
    sc = sdk_service(live)
    long_params = types.SamplingParams(max_tokens=45, seed=1, stop=[])
    short_params = types.SamplingParams(max_tokens=20, seed=2, stop=[])
    base = sc.create_sampling_client(base_model=BASE).result()
    _sample(base, short_params)  # compile outside the measured batch
    futures = [
        base.sample(PROMPT, num_samples=1, sampling_params=p) for p in (long_params, short_params)
    ]
    long_seq, short_seq = (f.result(timeout=120).sequences[0] for f in futures)
    assert (len(long_seq.tokens), len(short_seq.tokens)) == (45, 20)
    db = Database(live.settings.database_url)
    with db.core_read() as conn:
        rows = conn.execute(
            select(FutureRow.payload, FutureRow.started_at, FutureRow.finished_at)
            .where(FutureRow.request_type == "sample")
            .order_by(FutureRow.id.desc())
            .limit(2)
        ).all()
    db.dispose()
    # The SDK sends the two concurrently, so either may be stored first: tell them apart by
    # their max_tokens.
    by_tokens = {json.loads(r.payload)["request"]["sampling_params"]["max_tokens"]: r for r in rows}
    long_row, short_row = by_tokens[45], by_tokens[20]
    assert max(long_row.started_at, short_row.started_at) < short_row.finished_at  # one batch
    assert short_row.finished_at < long_row.finished_at


def test_concurrent_requests_of_a_group_run_as_one_batch(
    live: RunningServer, sdk_service: Callable[[RunningServer], tinker.ServiceClient]
) -> None:
    """An RL group as the cookbook sends it (one request per rollout, all at once) is claimed
    as one batch, and each rollout gets the tokens its request gets alone."""
    sc = sdk_service(live)
    tc = sc.create_lora_training_client(BASE, rank=8, seed=3).result(timeout=120)
    sampling = tc.save_weights_and_get_sampling_client().result(timeout=120)
    params = [types.SamplingParams(max_tokens=6, seed=s, stop=[]) for s in range(4)]
    futures = [sampling.sample(PROMPT, num_samples=1, sampling_params=p) for p in params]
    together = [f.result(timeout=120) for f in futures]
    db = Database(live.settings.database_url)
    with db.core_read() as conn:
        rows = conn.execute(
            select(FutureRow.started_at, FutureRow.finished_at)
            .where(FutureRow.request_type == "sample")
            .order_by(FutureRow.id.desc())
            .limit(4)
        ).all()
    # One batch: every request was claimed before any finished (the worker claims, then runs).
    assert max(r.started_at for r in rows) < min(r.finished_at for r in rows)
    db.dispose()
    for p, got in zip(params, together, strict=True):
        assert got.sequences[0].tokens == _sample(sampling, p).sequences[0].tokens
