"""Retry policy of the transport and the poller, against a scripted real HTTP server.

A scripted server is used because the tx-server never answers 5xx/429/``retry-after`` on
purpose; the policy under test is the client's (spec §1.6, §3.4).
"""

from __future__ import annotations

import socket
import time
from typing import Any

import httpx
import pytest

import tx_client
from tx_client._futures import APIFuture, ResultDecoder, poll_result
from tx_client._http import Transport, retry_delay
from tx_types import OptimStepResponse

API_KEY = "tml-tx-client-tests-0001"
OPTIM = ResultDecoder[OptimStepResponse]("OptimStep", OptimStepResponse)
FAST = {"retry-after-ms": "10"}  # keeps retry sleeps short; honoured by the client


def _transport(scripted: Any, **kw: Any) -> Transport:
    return Transport(scripted.url, API_KEY, **kw)


def test_5xx_is_retried_with_one_idempotency_key(scripted: Any) -> None:
    r = scripted.reply
    scripted.script(
        "create_session",
        r(503, {"detail": "busy"}, FAST),
        r(500, {"detail": "oops"}, FAST),
        r(200, {"session_id": "s1"}),
    )
    response = _transport(scripted).request_sync("POST", "create_session", json={})
    assert response.json() == {"session_id": "s1"}
    calls = scripted.calls("create_session")
    assert [c.headers["x-stainless-retry-count"] for c in calls] == ["0", "1", "2"]
    assert len({c.headers["x-idempotency-key"] for c in calls}) == 1
    assert calls[0].headers["x-idempotency-key"].startswith("stainless-python-retry-")
    assert all(c.headers["x-api-key"] == API_KEY for c in calls)
    assert all(c.headers["content-type"] == "application/json" for c in calls)


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, tx_client.BadRequestError),
        (401, tx_client.AuthenticationError),
        (403, tx_client.PermissionDeniedError),
        (404, tx_client.NotFoundError),
        (422, tx_client.UnprocessableEntityError),
    ],
)
def test_non_retryable_4xx_fails_at_once_with_typed_error(
    scripted: Any, status: int, error: type[Exception]
) -> None:
    scripted.script("get_info", scripted.reply(status, {"detail": "nope: model_id"}))
    with pytest.raises(error) as info:
        _transport(scripted).request_sync("POST", "get_info", json={})
    assert isinstance(info.value, tx_client.APIStatusError)
    assert info.value.status_code == status
    assert "nope: model_id" in str(info.value)  # the server's message reaches the user
    assert len(scripted.calls("get_info")) == 1


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (408, tx_client.APIStatusError),
        (409, tx_client.ConflictError),
        (429, tx_client.RateLimitError),
        (502, tx_client.InternalServerError),
    ],
)
def test_retryable_statuses_exhaust_retries_then_raise(
    scripted: Any, status: int, error: type[Exception]
) -> None:
    scripted.script("optim_step", scripted.reply(status, {"detail": "later"}, FAST))
    transport = _transport(scripted, max_retries=2, retry_window=0)  # 429: window off
    with pytest.raises(error):
        transport.request_sync("POST", "optim_step", json={})
    assert len(scripted.calls("optim_step")) == 3


def test_x_should_retry_header_overrides_status(scripted: Any) -> None:
    r = scripted.reply
    scripted.script("a", r(500, {"detail": "x"}, {"x-should-retry": "false"}))
    with pytest.raises(tx_client.InternalServerError):
        _transport(scripted).request_sync("POST", "a", json={})
    assert len(scripted.calls("a")) == 1
    scripted.script("b", r(400, {"detail": "x"}, {"x-should-retry": "true", **FAST}), r(200, {}))
    _transport(scripted).request_sync("POST", "b", json={})
    assert len(scripted.calls("b")) == 2


def test_retry_after_header_sets_the_delay(scripted: Any) -> None:
    r = scripted.reply
    scripted.script("c", r(429, {"detail": "slow down"}, {"retry-after": "0.3"}), r(200, {}))
    started = time.monotonic()
    _transport(scripted).request_sync("POST", "c", json={})
    assert 0.3 <= time.monotonic() - started < 2.0


def test_retry_delay_policy() -> None:
    assert retry_delay(0, httpx.Headers({"retry-after-ms": "250"})) == 0.25
    assert retry_delay(0, httpx.Headers({"retry-after": "2"})) == 2.0
    for attempt, cap in [(0, 0.5), (1, 1.0), (2, 2.0), (5, 10.0), (9, 10.0)]:
        delay = retry_delay(attempt, httpx.Headers({"retry-after": "600"}))  # > 60 s: ignored
        assert 0.75 * cap <= delay <= cap


def test_connection_refused_is_retried_then_api_connection_error() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    transport = Transport(f"http://127.0.0.1:{port}", API_KEY, max_retries=1)
    with pytest.raises(tx_client.APIConnectionError):
        transport.request_sync("POST", "x", json={})


def _poll(scripted: Any) -> APIFuture[OptimStepResponse]:
    transport = _transport(scripted, max_retries=0)
    return APIFuture.from_coroutine(poll_result(transport, "req-1", OPTIM))


def test_poller_repolls_408_try_again_and_5xx_then_returns(scripted: Any) -> None:
    r = scripted.reply
    scripted.script(
        "retrieve_future",
        r(408, {"detail": "pending"}),
        r(200, {"type": "try_again", "request_id": "req-1", "queue_state": "active"}),
        r(503, {"detail": "restarting"}),
        r(200, {"status": "complete_metadata", "response_payload_size": 10}),
        r(200, {"metrics": {"x:mean": 1.5}}),
    )
    assert _poll(scripted).result(timeout=10).metrics == {"x:mean": 1.5}
    calls = scripted.calls("retrieve_future")
    assert [c.headers["x-tinker-request-iteration"] for c in calls] == ["0", "1", "2", "3", "4"]
    assert all(c.headers["x-tinker-request-type"] == "OptimStep" for c in calls)
    assert all(c.headers["x-stainless-retry-count"] == "0" for c in calls)  # no transport retry


def test_poller_backs_off_on_429(scripted: Any) -> None:
    r = scripted.reply
    scripted.script("retrieve_future", r(429, {"detail": "slow"}), r(200, {"metrics": {}}))
    started = time.monotonic()
    assert _poll(scripted).result(timeout=10).metrics == {}
    assert time.monotonic() - started >= 1.0  # min(2**0, 30) s


def test_poller_gives_up_after_repeated_400_and_on_410(scripted: Any) -> None:
    scripted.script("retrieve_future", scripted.reply(400, {"detail": "bad"}))
    with pytest.raises(tx_client.BadRequestError):
        _poll(scripted).result(timeout=10)
    assert len(scripted.calls("retrieve_future")) == 4  # 1 + 3 re-polls
    scripted.replies.clear()
    scripted.script("retrieve_future", scripted.reply(410, {"detail": "expired"}))
    with pytest.raises(tx_client.APIStatusError) as info:
        _poll(scripted).result(timeout=10)
    assert info.value.status_code == 410


def test_poller_reports_failure_payload(scripted: Any) -> None:
    scripted.script("retrieve_future", scripted.reply(200, {"error": "boom", "category": "server"}))
    with pytest.raises(tx_client.RequestFailedError) as info:
        _poll(scripted).result(timeout=10)
    assert info.value.category == tx_client.types.RequestErrorCategory.Server
    scripted.replies.clear()
    scripted.script("retrieve_future", scripted.reply(200, {"error": "x", "category": "weird"}))
    with pytest.raises(tx_client.RequestFailedError) as info:
        _poll(scripted).result(timeout=10)
    assert info.value.category == tx_client.types.RequestErrorCategory.Unknown
