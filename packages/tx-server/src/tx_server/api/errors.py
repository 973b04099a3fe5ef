"""Error responses: every error is JSON with a Content-Length, status from one table.

The SDK treats a 400 without a body as a proxy glitch and retries it (spec §1.6 item 3), and
retries 5xx forever on ``retrieve_future``, so both rules are enforced here for every error
this server raises (:data:`tx_server.errors.ERROR_TABLE`), for FastAPI's validation errors and
for unexpected exceptions.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tx_server.errors import PollTimeoutError, TxServerError, spec_for

__all__ = ["install_error_handlers"]

log = logging.getLogger(__name__)


def _tx_error(_request: Request, exc: Exception) -> JSONResponse:
    spec = spec_for(exc)
    body: dict[str, str] = {"detail": str(exc) or type(exc).__name__, "category": spec.category}
    if isinstance(exc, PollTimeoutError):
        body["queue_state"] = "active"  # the SDK surfaces it to its queue-state observer
    return JSONResponse(body, status_code=spec.status)


def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error", exc_info=exc)
    return JSONResponse({"detail": "internal server error", "category": "server"}, 500)


def install_error_handlers(app: FastAPI) -> None:
    """Register the JSON error handlers on ``app``."""
    app.add_exception_handler(TxServerError, _tx_error)
    app.add_exception_handler(Exception, _unexpected)
