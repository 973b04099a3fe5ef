"""retrieve_future against a live server: wake-ups, 404/408, failures, protobuf, idempotency.

Requests are enqueued with :class:`FutureStore` (what the submission routes call) and finished
with :class:`WorkQueue` on a separate engine, from another thread — exactly the calls a worker
process makes. Results are read back both raw (httpx) and through the SDK's own future class.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tinker
from tinker.lib.api_future_impl import _APIFuture
from tinker.proto import tinker_public_pb2

from tx_server.auth import tenant_of_key
from tx_server.db.database import Database
from tx_server.errors import BadRequestError
from tx_server.futures import PROTOBUF, FutureStore, RequestType, Submission
from tx_server.testing import API_KEY, RunningServer, make_settings, run_server, wake_latencies
from tx_server.wake import wake_bus_for

TENANT = tenant_of_key(API_KEY)
HEADERS = {"X-API-Key": API_KEY}


@pytest.fixture
def store(server: RunningServer) -> Iterator[FutureStore]:
    db = Database(server.settings.database_url)
    yield FutureStore(db, wake_bus_for(db))
    db.dispose()


def _submit(store: FutureStore, seq_id: int, rtype: RequestType = RequestType.OPTIM_STEP) -> str:
    payload = json.dumps({"model_id": "s:train:0", "seq_id": seq_id}).encode()
    return store.submit(
        TENANT, Submission(rtype, payload, model_id="s:train:0", seq_id=seq_id, session_id="s")
    )


def _poll(url: str, request_id: str, key: str = API_KEY) -> httpx.Response:
    return httpx.post(
        f"{url}/api/v1/retrieve_future",
        json={"request_id": request_id, "allow_metadata_only": True},
        headers={"X-API-Key": key},
        timeout=60,
    )


def _sdk_future(sc: tinker.ServiceClient, model_cls: type, request_id: str, kind: str) -> object:
    """The SDK's own future (its real polling state machine) for ``request_id``."""
    untyped = tinker.types.UntypedAPIFuture(request_id=request_id)
    return _APIFuture(model_cls, sc.holder, untyped, time.time(), kind).result(timeout=60)


def test_unknown_request_id_is_404_with_json_body(server: RunningServer) -> None:
    response = _poll(server.url, "no-such-request")
    assert response.status_code == 404
    assert response.json()["detail"] == "unknown request_id 'no-such-request'"
    assert int(response.headers["content-length"]) == len(response.content) > 0


def test_completion_from_another_thread_wakes_the_poll_in_milliseconds(tmp_path: Path) -> None:
    # The safety re-check is 10 s here, so only the wake-up can answer well before it.
    settings = make_settings(tmp_path, future_recheck_seconds=10.0, long_poll_seconds=20.0)
    with run_server(settings) as server:
        db = Database(settings.database_url)
        store = FutureStore(db, wake_bus_for(db))
        latencies = wake_latencies(server, lambda i: _submit(store, i + 1), samples=5)
        median = statistics.median(latencies)
        print(
            f"SQLite/UDP wake-up latency: median {median * 1e3:.1f} ms, max {max(latencies) * 1e3:.1f} ms"
        )
        assert median < 0.25, latencies
        assert max(latencies) < 2.0, latencies  # a loaded CI box, still 5x below the re-check
        db.dispose()


def test_long_poll_ends_with_408_and_the_sdk_keeps_polling(
    tmp_path: Path, open_service_client: Callable[..., Any]
) -> None:
    with run_server(make_settings(tmp_path, long_poll_seconds=0.5)) as server:
        db = Database(server.settings.database_url)
        request_id = _submit(FutureStore(db, wake_bus_for(db)), 1)
        started = time.perf_counter()
        response = _poll(server.url, request_id)
        assert 0.45 < time.perf_counter() - started < 3.0
        assert response.status_code == 408
        assert response.json()["queue_state"] == "active"
        assert int(response.headers["content-length"]) == len(response.content)

        worker = server.queue()
        timer = threading.Timer(
            1.3, worker.complete, (request_id, b'{"metrics": {}}', "application/json")
        )
        timer.start()
        sc = open_service_client(server.url, API_KEY)
        result = _sdk_future(sc, tinker.types.OptimStepResponse, request_id, "OptimStep")
        assert result == tinker.types.OptimStepResponse(metrics={})
        polls = [c for c in server.recorder.calls if c.endswith("retrieve_future")]
        assert 3 <= len(polls) <= 6  # 408s re-polled at once, but each held for 0.5 s
        timer.join()
        sc.close("success").result(timeout=30)
        db.dispose()


def test_failed_future_is_200_error_body_and_sdk_request_failed_error(
    server: RunningServer, store: FutureStore, open_service_client: Callable[..., Any]
) -> None:
    request_id = _submit(store, 1)
    server.queue().fail(request_id, "target_tokens length 3 != input length 4", "user")
    response = _poll(server.url, request_id)
    assert response.status_code == 200
    assert response.json() == {
        "error": "target_tokens length 3 != input length 4",
        "category": "user",
    }
    sc = open_service_client(server.url, API_KEY)
    with pytest.raises(tinker.RequestFailedError) as info:
        _sdk_future(sc, tinker.types.OptimStepResponse, request_id, "OptimStep")
    assert info.value.category == tinker.types.RequestErrorCategory.User
    sc.close("success").result(timeout=30)


def test_protobuf_results_are_returned_as_protobuf(
    server: RunningServer, store: FutureStore, open_service_client: Callable[..., Any]
) -> None:
    request_id = _submit(store, 1, RequestType.FORWARD_BACKWARD)
    output = tinker_public_pb2.ForwardBackwardOutput(
        loss_fn_output_type="cross_entropy", metrics={"loss:sum": 1.25}
    )
    server.queue().complete(request_id, output.SerializeToString(), PROTOBUF)
    response = _poll(server.url, request_id)
    assert response.headers["content-type"] == PROTOBUF
    assert response.content == output.SerializeToString()
    sc = open_service_client(server.url, API_KEY)
    decoded = _sdk_future(sc, tinker.types.ForwardBackwardOutput, request_id, "ForwardBackward")
    assert decoded.metrics == {"loss:sum": 1.25}  # type: ignore[attr-defined]
    sc.close("success").result(timeout=30)


def test_resubmission_with_the_same_key_returns_the_original_request(store: FutureStore) -> None:
    first = _submit(store, 7, RequestType.FORWARD_BACKWARD)
    assert _submit(store, 7, RequestType.FORWARD_BACKWARD) == first
    assert _submit(store, 8, RequestType.FORWARD_BACKWARD) != first
    with pytest.raises(BadRequestError, match="seq_id 7 was already used by a 'forward_backward'"):
        _submit(store, 7, RequestType.OPTIM_STEP)
    # The unnamed-save quirk: same (model_id, seq_id), changed payload -> still the original.
    sample = Submission(RequestType.SAMPLE, b"{}", sampling_session_id="s:sample:0", seq_id=0)
    changed = Submission(RequestType.SAMPLE, b'{"x":1}', sampling_session_id="s:sample:0", seq_id=0)
    assert store.submit(TENANT, sample) == store.submit(TENANT, changed)
    create = Submission(RequestType.CREATE_MODEL, b"{}", session_id="s", model_seq_id=0)
    assert store.submit(TENANT, create) == store.submit(TENANT, create)
    assert store.submit(TENANT, Submission(RequestType.SAMPLE, b"{}")) != store.submit(
        TENANT, Submission(RequestType.SAMPLE, b"{}")
    )
    with pytest.raises(BadRequestError, match="another tenant"):
        store.submit("someone-else", create)


def test_requests_of_another_tenant_are_404(server: RunningServer, store: FutureStore) -> None:
    request_id = _submit(store, 1)
    server.queue().complete(request_id, b"{}", "application/json")
    assert _poll(server.url, request_id).status_code == 200
    assert _poll(server.url, request_id, key="tml-another-tenant").status_code == 404
    assert _poll(server.url, request_id, key="").status_code == 401
