"""Error types: the package's exception root and the wire form of a failed request.

``RequestFailedResponse`` is the terminal body of ``retrieve_future`` (HTTP 200,
``{"error": ..., "category": "user"|"server"|"unknown"}``); the SDK turns it into
``RequestFailedError``. The category is parsed leniently — a missing or unknown value means
``unknown`` — exactly as the SDK treats it (spec §3.5).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import field_validator

from ._base import WireModel

__all__ = [
    "InvalidTinkerPathError",
    "RequestErrorCategory",
    "RequestFailedResponse",
    "TxTypesError",
]


class TxTypesError(Exception):
    """Root of the exceptions raised by tx_types itself (pydantic raises ValidationError)."""


class InvalidTinkerPathError(TxTypesError, ValueError):
    """A ``tinker://`` path that does not follow the grammar of spec §6.9."""


class RequestErrorCategory(StrEnum):
    """Who is to blame for a failed request: ``user`` (bad input) or ``server`` (a fault)."""

    Unknown = "unknown"
    Server = "server"
    User = "user"


class RequestFailedResponse(WireModel):
    """Body of a terminally failed future."""

    error: str
    category: RequestErrorCategory = RequestErrorCategory.Unknown

    @field_validator("category", mode="before")
    @classmethod
    def _lenient_category(cls, value: Any) -> Any:
        try:
            return RequestErrorCategory(value)
        except ValueError:
            return RequestErrorCategory.Unknown
