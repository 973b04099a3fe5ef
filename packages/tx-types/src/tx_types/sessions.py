"""Client sessions: creation, heartbeats, finish, and the REST views of sessions.

A session groups a client's models and samplers; the heartbeat keeps it alive and ``finish``
ends it (after which heartbeats get 410). ``FinishSessionRequest``, ``AssignSessionProjectRequest``
and ``SessionTraceExportResponse`` are bodies the SDK builds by hand (no SDK type), typed here so
server and client agree on them.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator

from ._base import ModelID, WireModel
from .session_status import ClientSessionFinishReason

__all__ = [
    "AssignSessionProjectRequest",
    "CreateSessionRequest",
    "CreateSessionResponse",
    "FinishSessionRequest",
    "GetSessionResponse",
    "ListSessionsResponse",
    "SessionHeartbeatRequest",
    "SessionHeartbeatResponse",
    "SessionTraceExportResponse",
]


class CreateSessionRequest(WireModel):
    """``POST /api/v1/create_session``.

    ``user_metadata`` is required-but-nullable in the SDK, which always sends a dict; here a
    missing or null value becomes ``{}`` so our dumps are always accepted by the SDK. It is
    stored as JSON, so NaN/Infinity (which Python's parser accepts, PostgreSQL's JSON type and
    strict clients do not) are rejected anywhere inside it.
    """

    tags: list[str] = Field(default_factory=list)
    user_metadata: dict[str, Any] = Field(default_factory=dict)
    sdk_version: str
    project_id: str | None = None
    display_name: str | None = None
    type: Literal["create_session"] = "create_session"

    @field_validator("user_metadata", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("user_metadata")
    @classmethod
    def _json_compliant(cls, value: dict[str, Any]) -> dict[str, Any]:
        _reject_non_finite(value, "user_metadata")
        return value


def _reject_non_finite(value: Any, where: str) -> None:
    """ValueError naming the first NaN/±inf inside ``value`` (iterative: any nesting depth)."""
    stack = [(value, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{path} is {item!r}: NaN and Infinity are not valid JSON")
        if isinstance(item, dict):
            stack.extend((v, f"{path}[{k!r}]") for k, v in item.items())
        elif isinstance(item, list | tuple):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(item))


class CreateSessionResponse(WireModel):
    type: Literal["create_session"] = "create_session"
    info_message: str | None = None
    warning_message: str | None = None
    error_message: str | None = None
    session_id: str


class SessionHeartbeatRequest(WireModel):
    session_id: str
    type: Literal["session_heartbeat"] = "session_heartbeat"


class SessionHeartbeatResponse(WireModel):
    type: Literal["session_heartbeat"] = "session_heartbeat"


class FinishSessionRequest(WireModel):
    """``POST /api/v1/sessions/{id}/finish``: ``{"reason": {"type": ...}, "detail": ...}``."""

    reason: ClientSessionFinishReason
    detail: str | None = None


class GetSessionResponse(WireModel):
    training_run_ids: list[ModelID]
    sampler_ids: list[str]
    user_metadata: dict[str, str] | None = None
    display_name: str | None = None


class ListSessionsResponse(WireModel):
    sessions: list[str]


class AssignSessionProjectRequest(WireModel):
    """``PUT /api/v1/sessions/{id}/project`` body."""

    project_id: str


class SessionTraceExportResponse(WireModel):
    """``GET /api/v1/sessions/{id}/trace_export`` (polled every 5 s until not pending)."""

    status: Literal["pending", "ready", "failed"]
    url: str | None = None
    error: str | None = None
