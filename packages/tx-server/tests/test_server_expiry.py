"""Session expiry: no heartbeat for ``session_timeout_seconds`` → finished with reason expired.

Two paths are checked separately: the maintenance task (fast interval, nobody touches the
session) and the lazy check (maintenance effectively off, the late heartbeat itself expires
the session). Heartbeats go through the SDK's own resource method where the answer matters.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
import tinker
from tinker._client import AsyncTinker

from tx_server.db.database import Database
from tx_server.db.models import SessionRow
from tx_server.testing import API_KEY, RunningServer, make_settings, run_server

HEADERS = {"X-API-Key": API_KEY}


def _new_session(server: RunningServer) -> str:
    response = httpx.post(
        f"{server.url}/api/v1/create_session", json={"sdk_version": "0.38.0"}, headers=HEADERS
    )
    return str(response.json()["session_id"])


def _sdk_heartbeat(server: RunningServer, session_id: str) -> None:
    async def once() -> None:
        async with AsyncTinker(base_url=server.url, api_key=API_KEY, max_retries=0) as client:
            await client.service.session_heartbeat(session_id=session_id)

    asyncio.run(once())


def _row(server: RunningServer, session_id: str) -> SessionRow:
    db = Database(server.settings.database_url)
    try:
        with db.read() as s:
            row = s.get(SessionRow, session_id)
            assert row is not None
            return row
    finally:
        db.dispose()


def _wait_finished(server: RunningServer, session_id: str, limit: float = 15) -> SessionRow:
    deadline = time.monotonic() + limit
    while (row := _row(server, session_id)).finished_at is None:
        assert time.monotonic() < deadline, "the session was never expired"
        time.sleep(0.1)
    return row


def test_silent_session_is_expired_by_maintenance(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, session_timeout_seconds=2.0, maintenance_interval_seconds=0.2
    )
    with run_server(settings) as server:
        silent, alive = _new_session(server), _new_session(server)
        started = time.monotonic()
        while time.monotonic() - started < 3.5:  # heartbeats keep one of them alive
            _sdk_heartbeat(server, alive)
            time.sleep(0.3)
        row = _wait_finished(server, silent)
        assert (row.finish_reason, row.finish_detail) == ("expired", "no heartbeat for 2 s")
        assert _row(server, alive).finished_at is None
        with pytest.raises(tinker.APIStatusError) as info:
            _sdk_heartbeat(server, silent)
        assert info.value.status_code == 410  # the SDK's heartbeat loop stops on 410
        assert "expired" in str(info.value)
        finish = httpx.post(
            f"{server.url}/api/v1/sessions/{silent}/finish",
            json={"reason": {"type": "success"}, "detail": None},
            headers=HEADERS,
        )
        assert finish.status_code == 204
        assert _row(server, silent).finish_reason == "expired"  # the first reason wins


def test_late_heartbeat_expires_lazily_and_new_work_is_refused(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, session_timeout_seconds=0.5, maintenance_interval_seconds=3600
    )
    with run_server(settings) as server:
        session_id = _new_session(server)
        time.sleep(0.8)
        assert _row(server, session_id).finished_at is None  # no sweep ran
        with pytest.raises(tinker.APIStatusError) as info:
            _sdk_heartbeat(server, session_id)
        assert info.value.status_code == 410
        assert _row(server, session_id).finish_reason == "expired"
        body = {"session_id": session_id, "model_seq_id": 0, "base_model": "Qwen/Qwen3-0.6B"}
        response = httpx.post(f"{server.url}/api/v1/create_model", json=body, headers=HEADERS)
        assert response.status_code == 410
        assert "expired" in response.json()["detail"]


def test_timeout_none_never_expires(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, session_timeout_seconds=None, maintenance_interval_seconds=0.1
    )
    with run_server(settings) as server:
        session_id = _new_session(server)
        time.sleep(0.5)
        _sdk_heartbeat(server, session_id)
        assert _row(server, session_id).finished_at is None
