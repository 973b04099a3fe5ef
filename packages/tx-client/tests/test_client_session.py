"""tx-client against a real tx-server: bootstrap, heartbeat, finish, capabilities, auth."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

import tx_client
from tx_server.db.database import Database
from tx_server.db.models import SessionRow
from tx_server.testing import RunningServer, make_settings, run_server

API_KEY = "tml-tx-client-tests-0001"


@dataclass(frozen=True)
class _Row:
    user_metadata: object
    finish_reason: str | None
    finish_detail: str | None


def _session_row(server: RunningServer, session_id: str) -> _Row:
    """The server's stored session, read straight from its database."""
    db = Database(server.settings.database_url)
    try:
        with db.read() as s:
            row = s.scalar(select(SessionRow).where(SessionRow.id == session_id))
            assert row is not None
            return _Row(row.user_metadata, row.finish_reason, row.finish_detail)
    finally:
        db.dispose()


def _without_telemetry(server: RunningServer) -> list[str]:
    return [c for c in server.recorder.calls if "telemetry" not in c]


def test_bootstrap_is_lazy_then_config_dynamic_config_create_session(
    server: RunningServer, open_service_client: Callable[..., Any]
) -> None:
    sc = open_service_client(server.url, API_KEY, sdk=tx_client, user_metadata={"purpose": "test"})
    assert server.recorder.calls == []  # construction does no I/O
    session_id = sc.get_session_id()
    assert _without_telemetry(server) == [
        "POST /api/v1/client/config",
        "POST /api/v1/client/dynamic_config",
        "POST /api/v1/create_session",
    ]
    assert sc.get_session_id() == session_id  # created once
    assert _session_row(server, session_id).user_metadata == {"purpose": "test"}
    sc.close().result(timeout=10)


def test_heartbeat_runs_and_with_block_finishes_the_session(server: RunningServer) -> None:
    with tx_client.ServiceClient(
        base_url=server.url, api_key=API_KEY, heartbeat_interval=0.1
    ) as sc:
        session_id = sc.get_session_id()
        deadline = time.monotonic() + 10
        while server.recorder.calls.count("POST /api/v1/session_heartbeat") < 2:
            assert time.monotonic() < deadline, "no heartbeats"
            time.sleep(0.05)
    assert f"POST /api/v1/sessions/{session_id}/finish" in server.recorder.calls
    assert _session_row(server, session_id).finish_reason == "success"
    beats = server.recorder.calls.count("POST /api/v1/session_heartbeat")
    time.sleep(0.3)
    assert server.recorder.calls.count("POST /api/v1/session_heartbeat") == beats  # stopped


def test_with_block_records_errored_on_exception(server: RunningServer) -> None:
    sc = tx_client.ServiceClient(base_url=server.url, api_key=API_KEY)
    session_id = sc.get_session_id()

    def fail_inside() -> None:
        with sc:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_inside()
    row = _session_row(server, session_id)
    assert row.finish_reason == "errored"
    assert "boom" in (row.finish_detail or "")


def test_close_status_and_detail_first_wins(
    server: RunningServer, open_service_client: Callable[..., Any]
) -> None:
    sc = open_service_client(server.url, API_KEY, sdk=tx_client)
    session_id = sc.get_session_id()
    sc.close("interrupted", "ctrl-c").result(timeout=10)
    row = _session_row(server, session_id)
    assert (row.finish_reason, row.finish_detail) == ("interrupted", "ctrl-c")
    with pytest.raises(ValueError, match="status must be"):
        tx_client.ServiceClient(base_url=server.url, api_key=API_KEY).close("bad").result()  # type: ignore[arg-type]


def test_get_server_capabilities_sync_async_and_rest(
    server: RunningServer, open_service_client: Callable[..., Any]
) -> None:
    sc = open_service_client(server.url, API_KEY, sdk=tx_client)
    caps = sc.get_server_capabilities()
    assert [m.model_name for m in caps.supported_models] == server.settings.base_models
    assert asyncio.run(sc.get_server_capabilities_async()) == caps
    rest = tx_client.RestClient(base_url=server.url, api_key=API_KEY)
    assert rest.get_server_capabilities().result(timeout=10) == caps
    assert "POST /api/v1/create_session" not in server.recorder.calls  # session-less


def test_unknown_key_is_authentication_error_without_retries(tmp_path: Path) -> None:
    with run_server(make_settings(tmp_path, api_keys=[API_KEY])) as server:
        rest = tx_client.RestClient(base_url=server.url, api_key="tml-not-configured")
        with pytest.raises(tx_client.AuthenticationError) as info:
            rest.get_server_capabilities().result(timeout=10)
        assert info.value.status_code == 401
        assert server.recorder.calls == ["POST /api/v1/client/config"]  # one try, no storm
        ok = tx_client.RestClient(base_url=server.url, api_key=API_KEY)
        assert ok.get_server_capabilities().result(timeout=10).supported_models


def test_key_without_tml_prefix_never_reaches_the_server(server: RunningServer) -> None:
    with pytest.raises(tx_client.TinkerError, match="'tml-' prefix"):
        tx_client.ServiceClient(base_url=server.url, api_key="sk-123")
    assert server.recorder.calls == []


def test_base_url_and_key_from_environment(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TINKER_BASE_URL", "http://127.0.0.1:1")  # TX_ wins over TINKER_
    monkeypatch.setenv("TX_BASE_URL", server.url + "/")
    monkeypatch.setenv("TINKER_API_KEY", API_KEY)
    monkeypatch.delenv("TX_API_KEY", raising=False)
    rest = tx_client.RestClient()
    assert rest.holder.transport.base_url == server.url
    assert rest.get_server_capabilities().result(timeout=10).supported_models
    monkeypatch.delenv("TINKER_API_KEY")
    with pytest.raises(tx_client.TinkerError, match="api_key is required"):
        tx_client.RestClient()


def test_unknown_request_id_is_not_found(
    server: RunningServer, open_service_client: Callable[..., Any]
) -> None:
    from tx_client._futures import APIFuture, ResultDecoder, poll_result
    from tx_types import CreateModelResponse

    sc = open_service_client(server.url, API_KEY, sdk=tx_client)
    decoder = ResultDecoder[CreateModelResponse]("CreateModel", CreateModelResponse)
    future = APIFuture.from_coroutine(poll_result(sc.holder.transport, "no-such-id", decoder))
    with pytest.raises(tx_client.NotFoundError):
        future.result(timeout=10)
    assert server.recorder.calls.count("POST /api/v1/retrieve_future") == 1
