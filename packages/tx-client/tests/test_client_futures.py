"""``APIFuture`` polling against a real tx-server's ``retrieve_future``.

The server has no training endpoints yet, so each future is enqueued the way the API process
does (``FutureStore.submit``, same database) and finished the way the worker does
(``WorkQueue.complete`` / ``fail``) — the real queue and long-poll, nothing simulated.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

import tx_client
from tx_client._futures import APIFuture, ResultDecoder, poll_result
from tx_client._fwdbwd import FWD_BWD
from tx_server.auth import tenant_of_key
from tx_server.db.database import Database
from tx_server.futures import JSON, PROTOBUF, FutureStore, RequestType, Submission
from tx_server.testing import RunningServer
from tx_server.wake import wake_bus_for
from tx_types import ForwardBackwardOutput, OptimStepResponse, RequestErrorCategory, TensorData
from tx_types.proto import encode_forward_backward_output

API_KEY = "tml-tx-client-tests-0001"
OPTIM = ResultDecoder[OptimStepResponse]("OptimStep", OptimStepResponse)


@pytest.fixture
def store(server: RunningServer) -> Iterator[FutureStore]:
    db = Database(server.settings.database_url)
    yield FutureStore(db, wake_bus_for(db))
    db.dispose()


def _enqueue(store: FutureStore) -> str:
    return store.submit(tenant_of_key(API_KEY), Submission(RequestType.SAMPLE, b"{}"))


def _finish_later(server: RunningServer, request_id: str, delay: float, **how: object) -> None:
    def run() -> None:
        time.sleep(delay)
        queue = server.queue()
        if "message" in how:
            queue.fail(request_id, str(how["message"]), how["category"])  # type: ignore[arg-type]
        else:
            queue.complete(request_id, how["payload"], str(how["content_type"]))  # type: ignore[arg-type]
        queue.db.dispose()

    threading.Thread(target=run, daemon=True).start()


def _poll(
    server: RunningServer, request_id: str, decoder: ResultDecoder[object]
) -> APIFuture[object]:
    transport = tx_client.RestClient(base_url=server.url, api_key=API_KEY).holder.transport
    return APIFuture.from_coroutine(poll_result(transport, request_id, decoder))


def test_pending_future_long_polls_then_returns_json_result(
    server: RunningServer, store: FutureStore
) -> None:
    request_id = _enqueue(store)
    payload = b'{"metrics": {"grad_norm:mean": 0.5}}'
    _finish_later(server, request_id, 1.2, payload=payload, content_type=JSON)
    started = time.monotonic()
    result = _poll(server, request_id, OPTIM).result(timeout=20)  # type: ignore[arg-type]
    assert result == OptimStepResponse(metrics={"grad_norm:mean": 0.5})
    polls = server.recorder.calls.count("POST /api/v1/retrieve_future")
    assert 2 <= polls <= 5  # 408 after each 0.5 s long-poll, re-polled at once, no storm
    assert time.monotonic() - started < 5


def test_protobuf_result_is_decoded(server: RunningServer, store: FutureStore) -> None:
    output = ForwardBackwardOutput(
        loss_fn_output_type="ArrayRecord",
        loss_fn_outputs=[
            {"logprobs": TensorData.from_numpy(np.array([-0.5, -1.25], np.float32))},
            {"logprobs": TensorData.from_numpy(np.array([-2.0], np.float32))},
        ],
        metrics={"loss:sum": 3.75},
    )
    request_id = _enqueue(store)
    server.queue().complete(request_id, encode_forward_backward_output(output), PROTOBUF)
    result = _poll(server, request_id, FWD_BWD).result(timeout=20)  # type: ignore[arg-type]
    assert result == output


def test_failed_future_raises_request_failed_with_category(
    server: RunningServer, store: FutureStore
) -> None:
    request_id = _enqueue(store)
    _finish_later(server, request_id, 0.2, message="target_tokens too long", category="user")
    with pytest.raises(tx_client.RequestFailedError) as info:
        _poll(server, request_id, OPTIM).result(timeout=20)  # type: ignore[arg-type]
    assert info.value.category is RequestErrorCategory.User
    assert info.value.request_id == request_id
    assert "target_tokens too long" in str(info.value)


def test_future_is_awaitable_from_another_event_loop(
    server: RunningServer, store: FutureStore
) -> None:
    request_id = _enqueue(store)
    server.queue().complete(request_id, b'{"metrics": {}}', JSON)

    async def main() -> object:
        future = _poll(server, request_id, OPTIM)  # type: ignore[arg-type]
        first = await future
        again = await future.result_async(timeout=5)  # a done future can be awaited again
        assert first == again
        return first

    assert asyncio.run(main()) == OptimStepResponse(metrics={})


def test_result_of_the_wrong_encoding_is_an_error(
    server: RunningServer, store: FutureStore
) -> None:
    request_id = _enqueue(store)
    server.queue().complete(request_id, b'{"loss_fn_output_type": "x"}', JSON)
    with pytest.raises(ValueError, match="must be protobuf"):
        _poll(server, request_id, FWD_BWD).result(timeout=20)  # type: ignore[arg-type]


def test_result_timeout_leaves_future_pending(server: RunningServer, store: FutureStore) -> None:
    request_id = _enqueue(store)
    future = _poll(server, request_id, OPTIM)  # type: ignore[arg-type]
    with pytest.raises(TimeoutError):
        future.result(timeout=0.2)
    server.queue().complete(request_id, b'{"metrics": {"a:sum": 1.0}}', JSON)
    assert future.result(timeout=20) == OptimStepResponse(metrics={"a:sum": 1.0})
