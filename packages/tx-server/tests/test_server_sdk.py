"""The unmodified tinker SDK 0.38.0 against a live server: bootstrap, heartbeat, finish, auth."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tinker
from sqlalchemy import select
from tinker._client import AsyncTinker

from tx_server.db.database import Database
from tx_server.db.models import SessionRow
from tx_server.testing import API_KEY, RunningServer, make_settings, run_server


def _heartbeat(url: str, key: str, session_id: str) -> tinker.types.SessionHeartbeatResponse:
    """One heartbeat through the SDK's own resource method (no retries, like its loop)."""

    async def once() -> tinker.types.SessionHeartbeatResponse:
        async with AsyncTinker(base_url=url, api_key=key, max_retries=0) as client:
            return await client.service.session_heartbeat(session_id=session_id)

    return asyncio.run(once())


def _session_row(server: RunningServer, session_id: str) -> SessionRow:
    db = Database(server.settings.database_url)
    try:
        with db.read() as s:
            row = s.scalar(select(SessionRow).where(SessionRow.id == session_id))
            assert row is not None
            return row
    finally:
        db.dispose()


def test_service_client_bootstraps_heartbeats_and_finishes(server: RunningServer) -> None:
    with tinker.ServiceClient(
        base_url=server.url, api_key=API_KEY, user_metadata={"purpose": "test"}
    ) as sc:
        session_id = sc.holder.get_session_id()
        assert _heartbeat(server.url, API_KEY, session_id).type == "session_heartbeat"
    calls = [c for c in server.recorder.calls if "telemetry" not in c]
    assert calls[:3] == [
        "POST /api/v1/client/config",
        "POST /api/v1/client/dynamic_config",
        "POST /api/v1/create_session",
    ]
    assert f"POST /api/v1/sessions/{session_id}/finish" in calls
    row = _session_row(server, session_id)
    assert row.finish_reason == "success"
    assert row.user_metadata == {"purpose": "test"}
    assert row.created_at.tzinfo is not None
    with pytest.raises(tinker.APIStatusError) as info:
        _heartbeat(server.url, API_KEY, session_id)
    assert info.value.status_code == 410


def test_close_with_error_status_is_recorded_first_wins(
    server: RunningServer, open_service_client: Callable[..., Any]
) -> None:
    sc = open_service_client(server.url, API_KEY)
    session_id = sc.holder.get_session_id()
    sc.close("errored", "boom").result(timeout=30)
    row = _session_row(server, session_id)
    assert (row.finish_reason, row.finish_detail) == ("errored", "boom")


def test_rest_client_server_capabilities(server: RunningServer) -> None:
    rest = tinker.RestClient(base_url=server.url, api_key=API_KEY)
    caps = rest.get_server_capabilities().result(timeout=30)
    assert [m.model_name for m in caps.supported_models] == server.settings.base_models
    assert all(m.trainable and m.sampleable for m in caps.supported_models)
    assert caps.supported_models[0].max_context_length == server.settings.engine.max_seq_len
    assert "POST /api/v1/create_session" not in server.recorder.calls


def test_unknown_key_is_401_without_retry_storm(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, api_keys=[API_KEY])
    with run_server(settings) as server:
        with pytest.raises(tinker.AuthenticationError):  # raised by the config fetch
            tinker.RestClient(base_url=server.url, api_key="tml-not-a-configured-key")
        assert server.recorder.calls == ["POST /api/v1/client/config"]  # no retries
        ok = tinker.RestClient(base_url=server.url, api_key=API_KEY)
        assert ok.get_server_capabilities().result(timeout=30).supported_models
