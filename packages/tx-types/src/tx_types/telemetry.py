"""Telemetry batches the SDK posts every 10 s (``POST /api/v1/telemetry``).

A server should accept anything and answer ``{"status": "accepted"}`` (any other answer makes
the SDK drop the batch). ``TelemetryEvent`` is an untagged union, as in the SDK: the variants are
told apart by their fields (``SESSION_END`` has ``duration``, exceptions have ``error_*``,
generic events ``event_name``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from ._base import WireModel

__all__ = [
    "EventType",
    "GenericEvent",
    "SessionEndEvent",
    "SessionStartEvent",
    "Severity",
    "TelemetryBatch",
    "TelemetryEvent",
    "TelemetryResponse",
    "TelemetrySendRequest",
    "UnhandledExceptionEvent",
]

EventType = Literal["SESSION_START", "SESSION_END", "UNHANDLED_EXCEPTION", "GENERIC_EVENT"]
Severity = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class _EventBase(WireModel):
    event: EventType
    event_id: str
    event_session_index: int
    severity: Severity
    timestamp: datetime


class SessionStartEvent(_EventBase):
    pass


class SessionEndEvent(_EventBase):
    duration: str
    """ISO 8601 duration."""


class UnhandledExceptionEvent(_EventBase):
    error_message: str
    error_type: str
    traceback: str | None = None


class GenericEvent(_EventBase):
    event_name: str
    event_data: dict[str, object] = Field(default_factory=dict)


# Most specific first: the smart union prefers the variant that uses the most fields.
TelemetryEvent = UnhandledExceptionEvent | GenericEvent | SessionEndEvent | SessionStartEvent


class TelemetrySendRequest(WireModel):
    events: list[TelemetryEvent]
    platform: str
    sdk_version: str
    session_id: str
    process_uuid: str


class TelemetryBatch(TelemetrySendRequest):
    """Same shape as ``TelemetrySendRequest`` (the SDK keeps both names)."""


class TelemetryResponse(WireModel):
    status: Literal["accepted"] = "accepted"
