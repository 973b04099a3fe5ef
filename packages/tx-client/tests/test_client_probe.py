"""Behaviours where tx-client differed from the official SDK 0.38.0, found by running the same
calls through both SDKs against one real tx-server (API + worker, the kit's tiny Qwen3).

Each test names the official behaviour it pins. All share one module-scoped server and one
training client, so the file stays fast.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import inspect
import pickle
import time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tinker
from sqlalchemy import select

import tx_client
from tx_client import types
from tx_server.db.database import Database
from tx_server.db.models import SessionRow
from tx_server.settings import EngineSettings
from tx_server.testing import RunningServer, run_hub_model_server
from tx_types import RequestErrorCategory

API_KEY = "tml-tx-client-tests-0001"
BASE = "Qwen/Qwen3-8B"
PROMPT = types.ModelInput.from_ints(list(range(20, 28)))


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    engine = EngineSettings(max_lora_rank=8, max_lora_adapters=4, max_seq_len=64)
    root = tmp_path_factory.mktemp("probe")
    with run_hub_model_server(
        root, base_models=[BASE], engine=engine, long_poll_seconds=2.0
    ) as server:
        yield server


@pytest.fixture(scope="module")
def service(live: RunningServer) -> Iterator[tx_client.ServiceClient]:
    sc = tx_client.ServiceClient(base_url=live.url, api_key=API_KEY)
    yield sc
    sc.close("success").result(timeout=30)


@pytest.fixture(scope="module")
def trainer(service: tx_client.ServiceClient) -> tx_client.TrainingClient:
    return service.create_lora_training_client(BASE, rank=4, seed=0)


@pytest.fixture(scope="module")
def sampler(service: tx_client.ServiceClient) -> tx_client.SamplingClient:
    return service.create_sampling_client(base_model=BASE)


def _datum() -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3, 4]),
        loss_fn_inputs={
            "target_tokens": np.array([2, 3, 4, 5], np.int64),
            "weights": np.ones(4, np.float32),
        },
    )


def _assert_user_failure(exc: BaseException) -> None:
    """What the official SDK raises when the server fails a request the user got wrong."""
    assert isinstance(exc, tinker.RequestFailedError | tx_client.RequestFailedError)
    assert exc.category == RequestErrorCategory.User


def test_unknown_loss_fn_is_a_user_failure_and_later_calls_still_run(
    trainer: tx_client.TrainingClient,
) -> None:
    # Official: RequestFailedError(category=user) from .result(); the client stays usable.
    # Before the fix tx-client raised pydantic's ValidationError and, worse, never gave up the
    # call's reserved request ids, so every later call on the model waited forever.
    future = trainer.forward([_datum()], "no_such_loss")
    with pytest.raises(tx_client.RequestFailedError) as info:
        future.result(timeout=30)
    _assert_user_failure(info.value)
    assert isinstance(info.value, ValueError)  # still what the pydantic error was
    assert "loss_fn" in str(info.value)
    later = trainer.forward([_datum()], "cross_entropy").result(timeout=60)
    assert "loss:sum" in later.metrics


def test_optim_step_with_a_dict_is_a_type_error_as_in_the_sdk(
    trainer: tx_client.TrainingClient,
) -> None:
    with pytest.raises(TypeError, match="Expected AdamParams"):
        trainer.optim_step({"learning_rate": 1e-3})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("num_samples", "params"),
    [(1, {"max_tokens": 2, "temperature": -1.0}), (1, {"max_tokens": 0}), (0, {"max_tokens": 2})],
)
def test_invalid_sample_arguments_fail_the_future_as_user_failures(
    sampler: tx_client.SamplingClient, num_samples: int, params: dict[str, Any]
) -> None:
    # Official: sample() returns a future; .result() raises RequestFailedError(user).
    future = sampler.sample(PROMPT, num_samples, params)
    with pytest.raises(tx_client.RequestFailedError) as info:
        future.result(timeout=30)
    _assert_user_failure(info.value)


def test_invalid_lora_rank_and_load_path_are_tinker_errors(
    service: tx_client.ServiceClient,
) -> None:
    # Official: the server answers 422 (an APIStatusError); both are TinkerErrors of the user.
    with pytest.raises(tx_client.RequestFailedError) as info:
        service.create_lora_training_client(BASE, rank=0)
    _assert_user_failure(info.value)
    with pytest.raises(tx_client.RequestFailedError) as info:
        service.create_training_client_from_state("not-a-tinker-path")
    _assert_user_failure(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompt_alt_tokens_k": -1}, "prompt_alt_tokens_k"),
        ({"include_prompt_logprobs": True, "prompt_logprobs_last_n": 0}, "1 or greater"),
        ({"prompt_logprobs_last_n": 2}, "include_prompt_logprobs"),
        (
            {"target_prompt_logprobs": types.TensorData(data=[1.0], dtype="float32", shape=[1])},
            "int64",
        ),
    ],
)
def test_sample_call_time_checks_raise_value_error_at_once(
    sampler: tx_client.SamplingClient, kwargs: dict[str, Any], match: str
) -> None:
    # Official: these are checked in sample() itself, before anything is submitted.
    with pytest.raises(ValueError, match=match):
        sampler.sample(PROMPT, 1, types.SamplingParams(max_tokens=1), **kwargs)


def test_api_future_future_is_a_method_and_coroutine_exists(
    sampler: tx_client.SamplingClient,
) -> None:
    future = sampler.compute_logprobs(PROMPT)
    raw = future.future()  # a method in the SDK (a property before the fix)
    assert isinstance(raw, concurrent.futures.Future)
    done, _ = concurrent.futures.wait([raw], timeout=60)
    assert done
    lps = asyncio.run(future.coroutine())
    assert lps[0] is None
    assert len(lps) == len(PROMPT.to_ints())
    with pytest.raises(TimeoutError):
        sampler.compute_logprobs(PROMPT).result(timeout=0.0001)


def test_sdk_keyword_arguments_are_accepted(
    service: tx_client.ServiceClient, trainer: tx_client.TrainingClient
) -> None:
    # `record_stability_info` (sampling-client creation) and the deprecated
    # `loss_type_input` (custom loss) exist in the SDK; passing them raised TypeError.
    sc2 = service.create_sampling_client(base_model=BASE, record_stability_info=False)
    assert sc2.get_base_model() == BASE
    snap = trainer.save_weights_and_get_sampling_client(None, None, False, "snapshot")
    assert snap.get_base_model() == BASE

    def loss(_: list[Any], logprobs: list[Any]) -> tuple[float, dict[str, float], list[Any]]:
        grads = [np.full_like(np.asarray(lp), -1.0) for lp in logprobs]
        return float(sum(-np.sum(lp) for lp in logprobs)), {}, grads

    with pytest.warns(DeprecationWarning, match="loss_type_input"):
        future = trainer.forward_backward_custom(
            [_datum()], loss, loss_type_input="logprobs", backend="numpy"
        )
    assert "surrogate_loss:sum" in future.result(timeout=60).metrics
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(ValueError, match="loss_type_input"):
            trainer.forward_backward_custom([_datum()], loss, loss_type_input="bogus")  # type: ignore[arg-type]


def test_sampling_client_pickles_and_round_trips_through_a_handle(
    sampler: tx_client.SamplingClient,
) -> None:
    # Official: SamplingClient is picklable (for worker processes) and has the credential-free
    # get_sampler_handle() / from_sampler_handle(). tx-client's failed to pickle (a lock).
    params = types.SamplingParams(max_tokens=2, seed=7)
    expected = sampler.sample(PROMPT, 1, params).result(timeout=60).sequences[0].tokens
    clone = pickle.loads(pickle.dumps(sampler))
    handle = sampler.get_sampler_handle()
    assert API_KEY not in base64.urlsafe_b64decode(handle).decode()
    rebuilt = tx_client.SamplingClient.from_sampler_handle(handle, api_key=API_KEY)
    for copy in (clone, rebuilt):
        assert copy.get_base_model() == BASE
        assert copy.sample(PROMPT, 1, params).result(timeout=60).sequences[0].tokens == expected


def test_backpressure_429_outlasts_max_retries(scripted: Any) -> None:
    # tx-server answers 429 + Retry-After when its queue is full. The SDK keeps retrying for
    # ~5 min (its sampler forever); tx-client gave up after max_retries (10) and raised
    # RateLimitError, failing a busy job within seconds. (Scripted server: a full queue on
    # demand; 12 answers > 10 retries.)
    busy = scripted.reply(429, {"detail": "queue full"}, {"retry-after-ms": "10"})
    page = {"training_runs": [], "cursor": {"offset": 0, "limit": 20, "total_count": 0}}
    scripted.script("training_runs", *[busy] * 12, scripted.reply(200, page))
    rest = tx_client.RestClient(base_url=scripted.url, api_key=API_KEY)
    assert rest.list_training_runs().result(timeout=30).cursor.total_count == 0
    assert len(scripted.calls("training_runs")) == 13


def test_top_level_names_of_the_sdk_exist() -> None:
    """``import tx_client as tinker`` then ``tinker.AdamOptimizerConfig`` … must work for every
    wire type the SDK exports at top level (the rest are SDK internals and admin tools)."""
    not_mirrored = {
        "AdminClient", "BackcompatSamplingClientFuture", "BackcompatTrainingClientFuture",
        "ExperimentalWarning", "LossHandle", "PerDatumLossFn", "RequestOptions", "Timeout",
        "__title__", "auth",
    }  # fmt: skip
    assert set(tinker.__all__) - set(tx_client.__all__) == not_mirrored
    for name in set(tinker.__all__) - not_mirrored:
        assert hasattr(tx_client, name), name


@pytest.mark.parametrize(
    "name", ["ServiceClient", "TrainingClient", "SamplingClient", "RestClient", "APIFuture"]
)
def test_public_method_parameters_match_the_sdk(name: str) -> None:
    """Every SDK parameter exists in tx-client at the same position with the same default
    (tx-client may add parameters after them)."""
    ours, theirs = getattr(tx_client, name), getattr(tinker, name)
    skip = {"create"}  # SamplingClient.create takes the SDK's internal holder
    for method in sorted(m for m in dir(theirs) if not m.startswith("_") and m not in skip):
        if not hasattr(ours, method) or not callable(getattr(theirs, method)):
            continue
        sdk = list(inspect.signature(getattr(theirs, method)).parameters.values())
        tx = list(inspect.signature(getattr(ours, method)).parameters.values())
        assert [p.name for p in tx[: len(sdk)]] == [p.name for p in sdk], method
        for a, b in zip(sdk, tx, strict=False):
            if a.default is not inspect.Parameter.empty:
                assert b.default == a.default, f"{method}({a.name})"


def test_closed_service_client_refuses_work_at_once(live: RunningServer) -> None:
    # Official: RuntimeError ("... is closed"); it takes ~30 s for work on an existing
    # training/sampling client. tx-client raises the same error without a request.
    sc = tx_client.ServiceClient(base_url=live.url, api_key=API_KEY)
    sampler = sc.create_sampling_client(base_model=BASE)
    sc.close("success").result(timeout=30)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="closed"):
        sampler.sample(PROMPT, 1, types.SamplingParams(max_tokens=1)).result(timeout=30)
    with pytest.raises(RuntimeError, match="closed"):
        sc.create_lora_training_client(BASE, rank=4)
    with pytest.raises(RuntimeError, match="closed"):
        sc.create_rest_client().list_training_runs().result(timeout=30)
    assert time.monotonic() - start < 5
    sc.close("errored").result(timeout=5)  # a second close is a no-op, as in the SDK


def test_with_block_finish_reason_and_reentry_match_the_sdk(live: RunningServer) -> None:
    # Official: a non-Exception BaseException (sys.exit(), a cancelled task) leaving the block
    # finishes the session as "interrupted" (tx-client said "errored" unless Ctrl-C), and
    # entering a closed client raises RuntimeError.
    sc = tx_client.ServiceClient(base_url=live.url, api_key=API_KEY)
    session_id = sc.get_session_id()
    with pytest.raises(SystemExit), sc:
        raise SystemExit(3)
    db = Database(live.settings.database_url)
    try:
        with db.read() as s:
            row = s.scalar(select(SessionRow).where(SessionRow.id == session_id))
            assert row is not None
            assert row.finish_reason == "interrupted"
    finally:
        db.dispose()
    with pytest.raises(RuntimeError, match="closed"), sc:
        pass
