"""Small endpoints and the error contract, over HTTP against a live server."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tx_server.auth import tenant_of_key
from tx_server.db.database import Database
from tx_server.futures import FutureStore, RequestType, Submission
from tx_server.testing import API_KEY, RunningServer, make_settings, run_server
from tx_server.wake import wake_bus_for

HEADERS = {"X-API-Key": API_KEY}


def _assert_json_error(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["content-length"]) == len(response.content) > 0
    body: dict[str, object] = response.json()
    return body


def test_config_endpoints_telemetry_and_health(server: RunningServer) -> None:
    with httpx.Client(base_url=f"{server.url}/api/v1", headers=HEADERS) as http:
        config = http.post("/client/config", json={"sdk_version": "0.38.0"}).json()
        assert config["pjwt_auth_enabled"] is False
        assert config["proto_compress_fwdbwd"] is False
        assert (
            http.post("/client/dynamic_config", json={"sdk_version": "0.38.0"}).json()[
                "refresh_interval_sec"
            ]
            == 300
        )
        event = {
            "event": "SESSION_START",
            "event_id": "e1",
            "event_session_index": 0,
            "severity": "INFO",
            "timestamp": "2026-01-01T00:00:00Z",
        }
        batch = {
            "events": [event],
            "platform": "linux",
            "sdk_version": "0.38.0",
            "session_id": "s",
            "process_uuid": "p",
        }
        assert http.post("/telemetry", json=batch).json() == {"status": "accepted"}
        assert http.post("/telemetry", json={"future": "shape"}).json() == {"status": "accepted"}
    assert httpx.get(f"{server.url}/api/v1/healthz").json() == {"status": "ok"}  # no key needed


def test_every_error_is_json_with_a_content_length(server: RunningServer) -> None:
    with httpx.Client(base_url=f"{server.url}/api/v1") as http:
        body = _assert_json_error(http.post("/client/config", json={}), 401)
        assert body["detail"] == "missing X-API-Key header"
        http.headers.update(HEADERS)
        _assert_json_error(http.post("/session_heartbeat", json={"session_id": "nope"}), 404)
        _assert_json_error(
            http.post("/sessions/nope/finish", json={"reason": {"type": "success"}}), 404
        )
        body = _assert_json_error(http.post("/create_session", json={"tags": []}), 422)
        assert "sdk_version" in str(body["detail"])
        _assert_json_error(http.get("/no/such/route"), 404)


def test_sessions_are_private_to_their_tenant(server: RunningServer) -> None:
    with httpx.Client(base_url=f"{server.url}/api/v1", headers=HEADERS) as http:
        body = {"tags": [], "user_metadata": {}, "sdk_version": "0.38.0", "type": "create_session"}
        retry = {"X-Idempotency-Key": "stainless-python-retry-1"}
        first = http.post("/create_session", json=body, headers=retry).json()["session_id"]
        assert http.post("/create_session", json=body, headers=retry).json()["session_id"] == first
        assert http.post("/create_session", json=body).json()["session_id"] != first
        other = {"X-API-Key": "tml-someone-else"}
        beat = {"session_id": first, "type": "session_heartbeat"}
        assert http.post("/session_heartbeat", json=beat, headers=other).status_code == 404
        finish = {"reason": {"type": "success"}, "detail": None}
        assert http.post(f"/sessions/{first}/finish", json=finish, headers=other).status_code == 404
        assert http.post("/session_heartbeat", json=beat).status_code == 200
        assert http.post(f"/sessions/{first}/finish", json=finish).status_code == 204
        assert http.post(f"/sessions/{first}/finish", json=finish).status_code == 204
        _assert_json_error(http.post("/session_heartbeat", json=beat), 410)


def test_the_app_prunes_old_finished_futures(tmp_path: Path) -> None:
    # Retention 2 s: long enough for the first poll to see the result even on a loaded
    # machine (building an httpx client alone took 0.5 s there), short enough to watch pruning.
    settings = make_settings(tmp_path, future_retention_seconds=2.0, prune_interval_seconds=0.1)
    with run_server(settings) as server, httpx.Client(headers=HEADERS, timeout=30) as http:
        db = Database(settings.database_url)
        rid = FutureStore(db, wake_bus_for(db)).submit(
            tenant_of_key(API_KEY), Submission(RequestType.SAMPLE, b"{}")
        )
        server.queue().complete(rid, b"{}", "application/json")
        url = f"{server.url}/api/v1/retrieve_future"
        assert http.post(url, json={"request_id": rid}).status_code == 200
        deadline = time.monotonic() + 15
        while http.post(url, json={"request_id": rid}).status_code != 404:
            assert time.monotonic() < deadline, "the pruning job never deleted the future"
            time.sleep(0.1)
        db.dispose()
