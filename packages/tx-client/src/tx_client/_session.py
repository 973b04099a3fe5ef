"""The per-ServiceClient session holder: bootstrap, counters, heartbeat, finish (spec §2).

Bootstrap is lazy and happens once, on the first call that needs it:
``client/config`` (fatal on error) → ``client/dynamic_config`` (a 404 means "defaults") →
``create_session`` → a heartbeat task every 10 s on the background loop (a 410 "session
finished" stops it; other failures are only logged). Session-less users (``RestClient``) stop
after the two config calls. The holder also owns the per-session counters
``model_seq_id`` and ``sampling_session_seq_id`` (spec §3.8).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from tx_client._errors import APIResponseValidationError, APIStatusError, NotFoundError
from tx_client._http import SDK_VERSION, Transport
from tx_client._loop import run_async
from tx_types import (
    ClientConfigResponse,
    ClientDynamicConfigResponse,
    CreateSessionRequest,
    CreateSessionResponse,
)

__all__ = ["HEARTBEAT_INTERVAL", "SessionHolder"]

logger = logging.getLogger("tx_client")

M = TypeVar("M", bound=BaseModel)
HEARTBEAT_INTERVAL = 10.0
FinishStatus = Literal["success", "errored", "interrupted"]


def dump(body: BaseModel | Mapping[str, Any]) -> Any:
    """A request body as the SDK sends it: JSON mode, ``None`` fields omitted."""
    if isinstance(body, BaseModel):
        return body.model_dump(mode="json", exclude_none=True)
    return {k: v for k, v in body.items() if v is not None}


class SessionHolder:
    """Connection, config and (lazily) the session of one ServiceClient/RestClient."""

    def __init__(
        self,
        transport: Transport,
        *,
        user_metadata: Mapping[str, Any] | None = None,
        project_id: str | None = None,
        display_name: str | None = None,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
    ) -> None:
        self.transport = transport
        self.user_metadata = dict(user_metadata or {})
        self.project_id = project_id or os.environ.get("TINKER_PROJECT_ID")
        self.display_name = display_name
        self.heartbeat_interval = heartbeat_interval
        self.config: ClientConfigResponse | None = None
        self.dynamic_config: ClientDynamicConfigResponse | None = None
        self.session_id: str | None = None
        self.finished = False
        self._bootstrap_lock: asyncio.Lock | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._counter_lock = threading.Lock()
        self._model_seq = itertools.count()
        self._sampling_seq = itertools.count()

    # -- wire helpers -------------------------------------------------------------------
    async def post(
        self, path: str, body: BaseModel | Mapping[str, Any] | None, model: type[M], **kw: Any
    ) -> M:
        """POST ``body`` as JSON and validate the answer as ``model`` (from any event loop)."""
        json_body = {} if body is None else dump(body)
        response = await run_async(self.transport.request("POST", path, json=json_body, **kw))
        return parse(response, model)

    async def get(self, path: str, model: type[M], **kw: Any) -> M:
        response = await run_async(self.transport.request("GET", path, **kw))
        return parse(response, model)

    async def send(self, method: str, path: str, **kw: Any) -> Any:
        """A call whose answer body does not matter (DELETE, publish, ttl…)."""
        return await run_async(self.transport.request(method, path, **kw))

    # -- bootstrap ------------------------------------------------------------------------
    async def ensure_config(self) -> ClientConfigResponse:
        """``client/config`` then ``client/dynamic_config`` (once)."""
        return await run_async(self._ensure_config())

    async def _lock(self) -> asyncio.Lock:
        if self._bootstrap_lock is None:
            self._bootstrap_lock = asyncio.Lock()
        return self._bootstrap_lock

    async def _ensure_config(self) -> ClientConfigResponse:
        async with await self._lock():
            if self.config is None:
                version = {"sdk_version": SDK_VERSION}
                self.config = await self.post("client/config", version, ClientConfigResponse)
                try:
                    self.dynamic_config = await self.post(
                        "client/dynamic_config", version, ClientDynamicConfigResponse
                    )
                except NotFoundError:
                    self.dynamic_config = ClientDynamicConfigResponse()
            return self.config

    async def ensure_session(self) -> str:
        """The session id, creating the session (and its heartbeat) on first use."""
        return await run_async(self._ensure_session())

    async def _ensure_session(self) -> str:
        await self._ensure_config()
        async with await self._lock():
            if self.session_id is None:
                self.session_id = await self._create_session()
                self._heartbeat = asyncio.create_task(self._heartbeat_loop(self.session_id))
            return self.session_id

    async def _create_session(self) -> str:
        tags = [t for t in os.environ.get("TINKER_TAGS", "").split(",") if t]
        request = CreateSessionRequest(
            tags=tags,
            user_metadata=self.user_metadata,
            sdk_version=SDK_VERSION,
            project_id=self.project_id,
            display_name=self.display_name,
        )
        answer = await self.post("create_session", request, CreateSessionResponse)
        for level, text in (
            (logging.INFO, answer.info_message),
            (logging.WARNING, answer.warning_message),
            (logging.ERROR, answer.error_message),
        ):
            if text:
                logger.log(level, "server: %s", text)
        return answer.session_id

    async def _heartbeat_loop(self, session_id: str) -> None:
        body = {"session_id": session_id, "type": "session_heartbeat"}
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                await self.transport.request(
                    "POST", "session_heartbeat", json=body, max_retries=0, timeout=10.0
                )
            except APIStatusError as exc:
                if exc.status_code == 410:
                    logger.info("session %s finished; heartbeat stopped", session_id)
                    return
                logger.warning("heartbeat failed: %s", exc)
            except Exception as exc:
                logger.warning("heartbeat failed: %s", exc)

    # -- counters -------------------------------------------------------------------------
    def next_model_seq_id(self) -> int:
        with self._counter_lock:
            return next(self._model_seq)

    def next_sampling_session_seq_id(self) -> int:
        with self._counter_lock:
            return next(self._sampling_seq)

    # -- shutdown -------------------------------------------------------------------------
    async def finish(self, status: FinishStatus, detail: str | None) -> None:
        """Stop the heartbeat and POST ``sessions/{id}/finish`` (first reason wins)."""
        await run_async(self._finish(status, detail))

    async def _finish(self, status: FinishStatus, detail: str | None) -> None:
        if status not in ("success", "errored", "interrupted"):
            raise ValueError(f"status must be success, errored or interrupted, got {status!r}")
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
        try:
            if self.session_id is not None and not self.finished:
                body = {"reason": {"type": status}, "detail": detail}  # detail: explicit null
                await self.transport.request(
                    "POST", f"sessions/{self.session_id}/finish", json=body
                )
                self.finished = True
        finally:
            self.transport.closed = True  # as in the SDK, a closed client does no more work
            await self.transport.aclose()


def parse(response: Any, model: type[M]) -> M:
    """Validate a 2xx JSON answer; a mismatch is an ``APIResponseValidationError``."""
    try:
        return model.model_validate_json(response.content or b"{}")
    except ValidationError as exc:
        raise APIResponseValidationError(response, response.text, str(exc)) from exc
