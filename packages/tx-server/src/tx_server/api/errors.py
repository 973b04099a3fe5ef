"""Error responses: every error is JSON with a Content-Length, status from one table.

The SDK treats a 400 without a body as a proxy glitch and retries it (spec §1.6 item 3), and
retries 5xx forever on ``retrieve_future``, so both rules are enforced here for every error
this server raises (:data:`tx_server.errors.ERROR_TABLE`), for FastAPI's validation errors and
for unexpected exceptions. Two API-only errors have their own handlers: backpressure (429 with
``Retry-After``/``retry-after-ms``, which both SDK retry layers honour) and a bad or expired
archive download link (403, as object stores answer an invalid signed URL).

Validation errors (422, category ``user``) are rendered here rather than by FastAPI's default
handler, which echoes each offending ``input`` back: a NaN/Infinity literal (Python's ``json``
accepts them) or bytes that are not UTF-8 then fail to serialise — a 500 that the SDK retries
for minutes — and a large bad body is sent back whole. Each error keeps what names the problem
(``loc``, ``msg``, ``type``) and drops ``input`` and ``ctx``.

A value that the database refuses (:class:`sqlalchemy.exc.DataError`: on PostgreSQL a string
with a NUL character or longer than its column, in a lookup or an insert; SQLite accepts both)
is the client's input, not a fault: 400, category ``user``, never the 500 that the SDK would
retry for minutes. Stored fields are checked by name before they reach the database
(:func:`tx_server.sessions.check_storable`); this handler covers every other path.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError

from tx_server.api.archive import ArchiveLinkError
from tx_server.errors import PollTimeoutError, TxServerError, spec_for
from tx_server.futures import BackpressureError

__all__ = ["install_error_handlers"]

log = logging.getLogger(__name__)

_MAX_MESSAGE_CHARS = 1000
"""A validator's message may quote the bad value (a 1 MB checkpoint name); keep answers small."""


def _tx_error(_request: Request, exc: Exception) -> JSONResponse:
    spec = spec_for(exc)
    body: dict[str, str] = {"detail": str(exc) or type(exc).__name__, "category": spec.category}
    if isinstance(exc, PollTimeoutError):
        body["queue_state"] = "active"  # the SDK surfaces it to its queue-state observer
    return JSONResponse(body, status_code=spec.status)


def _backpressure(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BackpressureError)
    headers = {
        "Retry-After": str(max(1, math.ceil(exc.retry_after))),
        "retry-after-ms": str(round(exc.retry_after * 1000)),
    }
    body = {"detail": str(exc), "category": "server"}
    return JSONResponse(body, status_code=429, headers=headers)


def _bad_link(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc), "category": "user"}, status_code=403)


def _validation_item(error: Any) -> dict[str, Any]:
    """One pydantic error as plain JSON: where (``loc``), what (``msg``) and its ``type``."""
    if not isinstance(error, dict):
        return {"loc": [], "msg": str(error)[:_MAX_MESSAGE_CHARS], "type": "value_error"}
    loc = [part if isinstance(part, int) else str(part) for part in error.get("loc", ())]
    message = str(error.get("msg", "invalid value"))
    if len(message) > _MAX_MESSAGE_CHARS:
        message = message[:_MAX_MESSAGE_CHARS] + "…"
    return {"loc": loc, "msg": message, "type": str(error.get("type", "value_error"))}


def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    body = {"detail": [_validation_item(e) for e in exc.errors()], "category": "user"}
    return JSONResponse(body, status_code=422)


def _unstorable(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DataError)
    reason = str(exc.orig).strip().splitlines()[0][:_MAX_MESSAGE_CHARS] if exc.orig else ""
    detail = f"a value in this request cannot be stored or looked up: {reason or 'invalid'}"
    return JSONResponse({"detail": detail, "category": "user"}, status_code=400)


def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error", exc_info=exc)
    return JSONResponse({"detail": "internal server error", "category": "server"}, 500)


def install_error_handlers(app: FastAPI) -> None:
    """Register the JSON error handlers on ``app``."""
    app.add_exception_handler(TxServerError, _tx_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(BackpressureError, _backpressure)
    app.add_exception_handler(ArchiveLinkError, _bad_link)
    app.add_exception_handler(DataError, _unstorable)
    app.add_exception_handler(Exception, _unexpected)
