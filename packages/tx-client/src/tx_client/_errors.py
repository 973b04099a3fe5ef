"""The exception hierarchy, one class per HTTP status family (names as in ``tinker``).

``TinkerError`` is the root. Transport failures are ``APIError`` subclasses carrying the
``httpx.Request``; a non-2xx answer is an ``APIStatusError`` subclass chosen by status (see
:func:`status_error`) whose message embeds the server's body, so a FastAPI ``{"detail": ...}``
reaches the user. A request that *completed* in a failed state (HTTP 200 ``{"error",
"category"}`` from ``retrieve_future``) is a :class:`RequestFailedError` with the category.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import httpx
import pydantic

from tx_types import RequestErrorCategory

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "BillingError",
    "ConflictError",
    "InternalServerError",
    "InvalidRequestError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestFailedError",
    "TinkerError",
    "UnprocessableEntityError",
    "invalid_request",
    "status_error",
]


class TinkerError(Exception):
    """Root of every error raised by tx-client."""


class APIError(TinkerError):
    """An error tied to one HTTP request; ``body`` is the decoded answer, if any."""

    def __init__(self, message: str, request: httpx.Request, *, body: object | None) -> None:
        super().__init__(message)
        self.message = message
        self.request = request
        self.body = body


class APIResponseValidationError(APIError):
    """A 2xx answer whose body does not match the expected wire type."""

    def __init__(self, response: httpx.Response, body: object | None, message: str) -> None:
        super().__init__(message, response.request, body=body)
        self.response = response
        self.status_code = response.status_code


class APIStatusError(APIError):
    """The server answered 4xx/5xx."""

    def __init__(self, message: str, response: httpx.Response, body: object | None) -> None:
        super().__init__(message, response.request, body=body)
        self.response = response
        self.status_code = response.status_code


class APIConnectionError(APIError):
    """No answer: connection refused/reset, DNS failure, protocol error."""

    def __init__(self, request: httpx.Request, message: str = "Connection error.") -> None:
        super().__init__(message, request, body=None)


class APITimeoutError(APIConnectionError):
    """The request timed out (retried like a connection error)."""

    def __init__(self, request: httpx.Request) -> None:
        super().__init__(request, "Request timed out.")


class BadRequestError(APIStatusError):
    """400."""


class AuthenticationError(APIStatusError):
    """401: missing or unknown API key."""


class BillingError(APIStatusError):
    """402."""


class PermissionDeniedError(APIStatusError):
    """403."""


class NotFoundError(APIStatusError):
    """404."""


class ConflictError(APIStatusError):
    """409 (retried before it is raised)."""


class UnprocessableEntityError(APIStatusError):
    """422: the body failed the server's validation."""


class RateLimitError(APIStatusError):
    """429 (retried with backoff before it is raised)."""


class InternalServerError(APIStatusError):
    """≥ 500 (retried with backoff before it is raised)."""


class RequestFailedError(TinkerError):
    """An accepted request finished in a failed state; ``category`` says whose fault it was."""

    def __init__(self, message: str, request_id: str, category: RequestErrorCategory) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        self.category = category

    def __reduce__(self) -> tuple[type[RequestFailedError], tuple[str, str, RequestErrorCategory]]:
        return (self.__class__, (self.message, self.request_id, self.category))


class InvalidRequestError(RequestFailedError, ValueError):
    """A request tx-client refused to send: its arguments fail the wire types' validation.

    The official SDK does not validate requests; it sends them and the server fails them, so
    user code sees a ``RequestFailedError`` of category ``user`` from ``.result()``. Raising
    this subclass from the same place keeps such code working unchanged while the mistake is
    still caught before a round trip. It is also a ``ValueError`` (as pydantic's
    ``ValidationError`` is) for code that caught the validation error directly. It never had a
    request id, so ``request_id`` is empty.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, "", RequestErrorCategory.User)

    def __reduce__(self) -> tuple[type[InvalidRequestError], tuple[str]]:  # type: ignore[override]
        return (self.__class__, (self.message,))


@contextlib.contextmanager
def invalid_request(what: str) -> Iterator[None]:
    """Turn a pydantic ``ValidationError`` raised while building ``what`` into an
    :class:`InvalidRequestError` (the category the server would have given it)."""
    try:
        yield
    except pydantic.ValidationError as exc:
        raise InvalidRequestError(f"invalid {what} request: {exc}") from exc


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    402: BillingError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


def _body_of(response: httpx.Response) -> object | None:
    try:
        return json.loads(response.content) if response.content else None
    except ValueError:
        return response.text


def status_error(response: httpx.Response) -> APIStatusError:
    """The typed exception for a non-2xx ``response``, message ``Error code: N - <body>``."""
    body = _body_of(response)
    detail = body.get("detail", body) if isinstance(body, dict) else body
    message = f"Error code: {response.status_code} - {detail if detail is not None else ''}"
    if response.status_code >= 500:
        return InternalServerError(message, response, body)
    cls = _BY_STATUS.get(response.status_code, APIStatusError)
    return cls(message, response, body)
