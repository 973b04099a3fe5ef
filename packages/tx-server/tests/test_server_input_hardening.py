"""Hostile input values over HTTP against a live server: always a 4xx naming the field, never 500.

A 500 is retried by the SDK for about five minutes (spec §1.6), and the unhandled exception
behind it also dropped the keep-alive connection, so the client's next request failed too. Each
test therefore also checks that the same connection still serves a normal request afterwards.
No worker runs: every rejection must happen before anything is queued.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import func, select

from tx_server.db.database import Database
from tx_server.db.models import FutureRow
from tx_server.testing import API_KEY, RunningServer

HEADERS = {"X-API-Key": API_KEY}


@pytest.fixture
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{server.url}/api/v1", headers=HEADERS, timeout=30) as client:
        yield client


def _model(http: httpx.Client) -> str:
    session = http.post("/create_session", json={"sdk_version": "0.38.0"}).json()["session_id"]
    body = {"session_id": session, "model_seq_id": 0, "base_model": "Qwen/Qwen3-0.6B"}
    model_id: str = http.post("/create_model", json=body).json()["model_id"]
    return model_id


def _raw(http: httpx.Client, path: str, body: str | bytes, **headers: str) -> httpx.Response:
    return http.post(path, content=body, headers={"Content-Type": "application/json", **headers})


def _rejected(response: httpx.Response, field: str, status: int = 422) -> str:
    """Assert a JSON user error with a Content-Length whose ``loc`` ends with ``field``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["content-length"]) == len(response.content) > 0
    body = response.json()
    assert body["category"] == "user"
    locs = [error["loc"] for error in body["detail"]]
    assert any(loc[-1] == field for loc in locs), locs
    return response.text


def _still_serving(http: httpx.Client) -> None:
    """The same keep-alive connection answers the next request (it was reset after a 500)."""
    assert http.get("/training_runs").status_code == 200


def _futures(server: RunningServer) -> int:
    db = Database(server.settings.database_url)
    with db.read() as session:
        count = session.scalar(select(func.count()).select_from(FutureRow))
    db.dispose()
    return int(count or 0)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_are_a_422_naming_the_field(
    server: RunningServer, http: httpx.Client, literal: str
) -> None:
    model_id = _model(http)
    queued = _futures(server)
    body = (
        f'{{"model_id": "{model_id}", "seq_id": 1, "adam_params": {{"learning_rate": {literal}}}}}'
    )
    _rejected(_raw(http, "/optim_step", body), "learning_rate")
    _still_serving(http)
    _rejected(_raw(http, "/retrieve_future", f'{{"request_id": {literal}}}'), "request_id")
    _rejected(_raw(http, "/create_session", f'{{"sdk_version": {literal}}}'), "sdk_version")
    _still_serving(http)
    assert _futures(server) == queued


def test_undecodable_bytes_are_a_422_not_a_500(http: httpx.Client) -> None:
    # Not declared as JSON, the body reaches validation as bytes, which used to be echoed back.
    response = _raw(http, "/create_session", b"\xff\xfe\x00", **{"Content-Type": "text/plain"})
    _rejected(response, "body")
    _still_serving(http)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"learning_rate": 1e308}, "learning_rate"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"learning_rate": 1e-4, "eps": 1e300}, "eps"),
        ({"learning_rate": 1e-4, "grad_clip_norm": -1e300}, "grad_clip_norm"),
    ],
)
def test_hyper_parameters_outside_float32_are_rejected(
    server: RunningServer, http: httpx.Client, params: dict[str, float], field: str
) -> None:
    model_id = _model(http)
    queued = _futures(server)
    body = {"model_id": model_id, "seq_id": 1, "adam_params": params}
    text = _rejected(http.post("/optim_step", json=body), field)
    assert _futures(server) == queued
    if params.get("learning_rate") == 1e308:
        assert "float32" in text
    ok = {"model_id": model_id, "seq_id": 1, "adam_params": {"learning_rate": 3e38}}
    assert http.post("/optim_step", json=ok).status_code == 200


def test_ints_beyond_the_database_columns_are_a_422(http: httpx.Client) -> None:
    model_id = _model(http)
    session = http.post("/create_session", json={"sdk_version": "0.38.0"}).json()["session_id"]
    optim = {"model_id": model_id, "seq_id": 2**63, "adam_params": {"learning_rate": 1e-4}}
    _rejected(http.post("/optim_step", json=optim), "seq_id")
    _rejected(http.post("/save_weights", json={"model_id": model_id, "seq_id": 10**30}), "seq_id")
    create = {"session_id": session, "model_seq_id": 2**31, "base_model": "Qwen/Qwen3-0.6B"}
    _rejected(http.post("/create_model", json=create), "model_seq_id")
    sampler = {"session_id": session, "sampling_session_seq_id": 2**40, "base_model": "b"}
    _rejected(http.post("/create_sampling_session", json=sampler), "sampling_session_seq_id")
    _still_serving(http)


def test_session_metadata_with_nan_is_a_422(http: httpx.Client) -> None:
    body = '{"sdk_version": "0.38.0", "user_metadata": {"a": {"b": NaN}}}'
    assert "user_metadata['a']['b']" in _rejected(
        _raw(http, "/create_session", body), "user_metadata"
    )


@pytest.mark.parametrize("route", ["/save_weights", "/save_weights_for_sampler"])
def test_overlong_checkpoint_names_fail_before_anything_is_queued(
    server: RunningServer, http: httpx.Client, route: str
) -> None:
    model_id = _model(http)
    queued = _futures(server)
    text = _rejected(http.post(route, json={"model_id": model_id, "path": "b" * 256}), "path")
    assert "200 bytes" in text
    assert str(server.settings.checkpoint_root) not in text
    assert _futures(server) == queued
    assert http.post(route, json={"model_id": model_id, "path": "b" * 200}).status_code == 200
    assert _futures(server) == queued + 1


def test_training_run_list_bounds_offset_and_access_scope(
    server: RunningServer, http: httpx.Client
) -> None:
    run_id = _model(http)
    for offset in [2**63, 2**63 - 1, 10**30]:
        _rejected(http.get("/training_runs", params={"limit": 1, "offset": offset}), "offset")
        _still_serving(http)
    page = http.get("/training_runs", params={"limit": 1, "offset": 2**62}).json()
    assert page["training_runs"] == []
    assert page["cursor"] == {"offset": 2**62, "limit": 1, "total_count": 1}

    _rejected(http.get("/training_runs", params={"access_scope": "bogus"}), "access_scope")
    _rejected(http.get(f"/training_runs/{run_id}", params={"access_scope": "all"}), "access_scope")
    for scope in ["owned", "accessible"]:
        runs = http.get("/training_runs", params={"access_scope": scope}).json()["training_runs"]
        assert [r["training_run_id"] for r in runs] == [run_id]
        one = http.get(f"/training_runs/{run_id}", params={"access_scope": scope})
        assert one.json()["training_run_id"] == run_id
