"""``APIFuture`` and the ``retrieve_future`` polling state machine (spec §3.2–3.5).

A work call POSTs its submission, gets ``{"request_id"}`` back at once, and the result is
fetched by long-polling ``POST /api/v1/retrieve_future``. How each answer is handled:

=========================================  ==============================================
answer                                     reaction
=========================================  ==============================================
200 ``application/x-protobuf``             decode (ForwardBackwardOutput / SampleResponse)
200 ``{"type": "try_again"}`` / 408        still pending: poll again at once
200 ``{"status": "complete_metadata"}``    poll again (we always ask for the full payload)
200 ``{"error", "category"}``              :class:`RequestFailedError` (terminal)
200 other JSON                             validated against the awaited wire type
5xx                                        poll again after a short capped delay
429, connection error, client timeout      poll again after ``min(2ⁿ, 30)`` s
400                                        up to 3 re-polls, then raised
410 and any other 4xx (401, 404, …)        raised as the typed status error
=========================================  ==============================================

The official SDK re-polls 5xx with zero delay; we add a small capped delay so a server that
fails permanently cannot turn the client into a hot loop (it still never gives up).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from tx_client._errors import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    RequestFailedError,
)
from tx_client._http import Transport
from tx_client._loop import in_background_loop, run_async, submit
from tx_types import RequestErrorCategory
from tx_types.proto import PROTOBUF_CONTENT_TYPE

__all__ = ["APIFuture", "ResultDecoder", "poll_result"]

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

POLL_TIMEOUT = 45.0  # client read timeout of one long poll (servers hold ≤ 30 s)
_MAX_BACKOFF = 30.0
_MAX_BAD_REQUESTS = 3


class APIFuture(Generic[T]):
    """The result of a call that may still be running: ``.result()`` or ``await fut``."""

    def __init__(self, future: concurrent.futures.Future[T]) -> None:
        self._future = future

    @classmethod
    def from_coroutine(cls, coro: Coroutine[Any, Any, T]) -> APIFuture[T]:
        """Start ``coro`` on the background loop and wrap its outcome."""
        return cls(submit(coro))

    @classmethod
    def completed(cls, value: T) -> APIFuture[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        future.set_result(value)
        return cls(future)

    def future(self) -> concurrent.futures.Future[T]:
        """The underlying ``concurrent.futures.Future`` (for ``concurrent.futures.wait`` and
        ``as_completed``; cancelling it cancels the operation). A method, as in the SDK."""
        return self._future

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> T:
        """Block until the result is there (``TimeoutError`` after ``timeout`` seconds)."""
        if in_background_loop() and not self._future.done():
            raise RuntimeError("APIFuture.result() would deadlock here; use `await` instead")
        return self._future.result(timeout)

    async def result_async(self, timeout: float | None = None) -> T:
        """Await the result from any event loop."""
        return await asyncio.wait_for(asyncio.wrap_future(self._future), timeout)

    async def coroutine(self) -> T:
        """This future as a coroutine, for APIs that need one (``asyncio.create_task``)."""
        return await self.result_async()

    def __await__(self) -> Generator[Any, None, T]:
        return self.result_async().__await__()


@dataclass(frozen=True)
class ResultDecoder(Generic[T]):
    """How to read a finished request: a JSON wire model, or a protobuf decoder."""

    request_type: str
    """``X-Tinker-Request-Type`` header value, e.g. ``ForwardBackward``."""
    json_model: type[BaseModel] | None = None
    proto: Callable[[bytes], T] | None = None

    def decode_proto(self, response_body: bytes) -> T:
        if self.proto is None:
            raise ValueError(f"unexpected protobuf result for a {self.request_type} request")
        return self.proto(response_body)

    def decode_json(self, payload: dict[str, Any]) -> T:
        if self.json_model is None:
            raise ValueError(f"{self.request_type} results must be protobuf, the server sent JSON")
        result: T = self.json_model.model_validate(payload)  # type: ignore[assignment]
        return result


def _failed(request_id: str, payload: dict[str, Any]) -> RequestFailedError:
    try:
        category = RequestErrorCategory(payload.get("category", "unknown"))
    except ValueError:
        category = RequestErrorCategory.Unknown
    return RequestFailedError(str(payload["error"]), request_id, category)


class _Poller(Generic[T]):
    """One request's polling loop; the per-answer rules are in the module table."""

    def __init__(self, transport: Transport, request_id: str, decoder: ResultDecoder[T]) -> None:
        self.transport = transport
        self.request_id = request_id
        self.decoder = decoder
        self.iteration = 0
        self.backoff_step = 0
        self.bad_requests = 0
        self.server_errors = 0

    def _headers(self) -> dict[str, str]:
        accept = PROTOBUF_CONTENT_TYPE if self.decoder.proto else "application/json"
        return {
            "Accept": accept,
            "X-Tinker-Request-Type": self.decoder.request_type,
            "X-Tinker-Request-Iteration": str(self.iteration),
        }

    async def _backoff(self) -> None:
        await asyncio.sleep(min(2.0**self.backoff_step, _MAX_BACKOFF))
        self.backoff_step += 1

    async def _on_status_error(self, exc: APIStatusError) -> None:
        """Sleep as the status requires, or re-raise when it is terminal."""
        self.backoff_step = 0 if exc.status_code != 429 else self.backoff_step
        code = exc.status_code
        if code == 408:
            return
        if code >= 500:
            self.server_errors += 1
            await asyncio.sleep(min(0.05 * 2.0**self.server_errors, 2.0))
            return
        if code == 429:
            await self._backoff()
            return
        if code == 400 and self.bad_requests < _MAX_BAD_REQUESTS:
            self.bad_requests += 1
            return
        raise exc

    async def run(self) -> T:
        while True:
            try:
                response = await self.transport.request(
                    "POST",
                    "retrieve_future",
                    json={"request_id": self.request_id, "allow_metadata_only": False},
                    headers=self._headers(),
                    max_retries=0,
                    timeout=POLL_TIMEOUT,
                )
            except APIStatusError as exc:
                await self._on_status_error(exc)
                self.iteration += 1
                continue
            except APIConnectionError:  # includes timeouts
                await self._backoff()
                self.iteration += 1
                continue
            self.backoff_step = 0
            self.iteration += 1
            if PROTOBUF_CONTENT_TYPE in response.headers.get("content-type", ""):
                return self.decoder.decode_proto(response.content)
            try:
                payload = json.loads(response.content)
            except ValueError as exc:
                raise APIResponseValidationError(
                    response, response.text, f"retrieve_future answered non-JSON: {exc}"
                ) from exc
            if not isinstance(payload, dict):
                raise APIResponseValidationError(response, payload, "expected a JSON object")
            if payload.get("type") == "try_again" or payload.get("status") == "complete_metadata":
                continue
            if "error" in payload:
                raise _failed(self.request_id, payload)
            try:
                return self.decoder.decode_json(payload)
            except ValidationError as exc:
                raise APIResponseValidationError(response, payload, str(exc)) from exc


async def poll_result(transport: Transport, request_id: str, decoder: ResultDecoder[T]) -> T:
    """Poll ``request_id`` until it has an outcome; return the decoded result or raise."""
    return await run_async(_Poller(transport, request_id, decoder).run())
