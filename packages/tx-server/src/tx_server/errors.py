"""The error contract of the server: one root exception and one table to HTTP and the wire.

Why a table: the SDK's retry layers make the status code part of the protocol (spec §1.6,
§3.4). 408/409/429/5xx are retried for minutes, so a *permanent* error must never use them;
400/401/404/410/422 are surfaced at once. Keeping every mapping in :data:`ERROR_TABLE` makes
that rule reviewable in one place. The same table gives each error its wire category
(``user``/``server``/``unknown``) for failed futures (spec §3.5).

Code outside ``tx_server.api`` raises these exceptions, never ``HTTPException``; the API layer
turns them into JSON responses with a body and a Content-Length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "ERROR_TABLE",
    "BadRequestError",
    "ErrorSpec",
    "NotFoundError",
    "PollTimeoutError",
    "ServerFaultError",
    "SessionFinishedError",
    "TxServerError",
    "UnauthorizedError",
    "WireCategory",
    "category_of",
    "failure_message",
    "spec_for",
]

WireCategory = Literal["user", "server", "unknown"]


class TxServerError(Exception):
    """Root of every error the server raises on purpose."""


class BadRequestError(TxServerError):
    """The request is well-formed JSON but cannot be served (a user error, not retried)."""


class UnauthorizedError(TxServerError):
    """Missing, malformed or unknown API key."""


class NotFoundError(TxServerError):
    """The resource does not exist *for this tenant* (other tenants' ids look absent too)."""


class SessionFinishedError(TxServerError):
    """The session was finished; 410 stops the SDK's heartbeat loop (spec §4.6)."""


class PollTimeoutError(TxServerError):
    """A long-poll ended without a result; 408 makes the SDK re-poll at once (spec §3.4)."""


class ServerFaultError(TxServerError):
    """An internal fault while executing a request (category ``server`` on a failed future)."""


@dataclass(frozen=True)
class ErrorSpec:
    """How one error class appears on the wire."""

    status: int
    category: WireCategory


ERROR_TABLE: dict[type[TxServerError], ErrorSpec] = {
    BadRequestError: ErrorSpec(400, "user"),
    UnauthorizedError: ErrorSpec(401, "user"),
    NotFoundError: ErrorSpec(404, "user"),
    SessionFinishedError: ErrorSpec(410, "user"),
    PollTimeoutError: ErrorSpec(408, "unknown"),
    ServerFaultError: ErrorSpec(500, "server"),
    TxServerError: ErrorSpec(500, "server"),
}


def spec_for(error: BaseException) -> ErrorSpec:
    """The most specific table entry for ``error``; foreign exceptions are server faults."""
    for cls in type(error).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return ERROR_TABLE[ServerFaultError]


def category_of(error: BaseException) -> WireCategory:
    """The wire category of a failed request's exception (what the worker stores on ``fail``).

    Engine errors carry a class-level ``category`` (``tx_engine.errors.TxEngineError``); it is
    read by duck typing rather than imported, because importing anything under ``tx_engine``
    from the API process risks pulling in jax.
    """
    if isinstance(error, TxServerError):
        return spec_for(error).category
    category = getattr(type(error), "category", None)
    if category in ("user", "server"):
        return category  # type: ignore[no-any-return]
    return "server"


_ENGINE_CALL_INDEX = re.compile(r"^(?:requests|groups)\[\d+\][.:]?\s*")


def failure_message(error: BaseException) -> str:
    """A failed request's message for its owner (what the worker stores on ``fail``).

    The engine names a bad field by the request's place in its call (``requests[2].max_tokens
    …``, ``groups[0].data[1].target_tokens …``). That place depends on what else the worker
    batched or joined with the request and means nothing to the client, so it is dropped;
    the field, and the datum's index within the request, stay. A failing server file is
    named by its error, not its path.
    """
    if isinstance(error, OSError) and (error.filename is not None or error.filename2 is not None):
        # A failing server file (disk full, permissions): its path means nothing to the client
        # and shows another tenant the server's layout; the log has the whole error.
        reason = error.strerror or "input/output error"
        return f"{type(error).__name__}: {reason} (server storage; the server log has the path)"
    return _ENGINE_CALL_INDEX.sub("", str(error)) or type(error).__name__
