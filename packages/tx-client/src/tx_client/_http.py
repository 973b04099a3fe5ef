"""The one HTTP transport of tx-client: auth, headers, typed errors, retries with backoff.

Every request goes through :meth:`Transport.request` (a coroutine on the background loop;
:meth:`Transport.request_sync` blocks on it). Retry policy (spec §1.6), kept in one place:

* retried: connection errors, timeouts, and statuses 408, 409, 429, ≥ 500 — unless the answer
  carries ``x-should-retry: false`` (``true`` forces a retry of any status);
* a 429 is backpressure, not failure: past ``max_retries`` it is still retried until
  ``retry_window`` (300 s) has passed since the call began, as the SDK's outer retry layer does
  (its sampler even waits indefinitely). Otherwise a full server queue (tx-server answers 429
  with ``Retry-After: 1``) would fail a busy job after ten seconds. A call made with
  ``max_retries=0`` (heartbeat, polling) is never retried;
* never retried: every other 4xx, so a 401 fails at once instead of a retry storm;
* delay: ``retry-after-ms`` / ``retry-after`` (seconds or HTTP date) when 0 < value ≤ 60 s,
  else ``min(0.5·2ⁿ, 10)`` s minus up to 25 % jitter;
* one ``X-Idempotency-Key`` per call, identical on each of its retries, so a server can
  recognise a re-sent submission.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import time
import uuid
from collections.abc import Mapping
from typing import Any

import httpx

from tx_client._errors import APIConnectionError, APITimeoutError, TinkerError, status_error
from tx_client._loop import submit

__all__ = [
    "DEFAULT_BASE_URL",
    "Transport",
    "is_retryable_status",
    "resolve_api_key",
    "resolve_base_url",
    "retry_delay",
]

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
SDK_VERSION = "0.38.0"  # the official SDK version whose protocol we speak
DEFAULT_MAX_RETRIES = 10
DEFAULT_TIMEOUT = 60.0
DEFAULT_RETRY_WINDOW = 300.0  # the SDK's holder-level retry layer (spec §1.6)
_MAX_RETRY_DELAY = 10.0
_INITIAL_RETRY_DELAY = 0.5


def resolve_base_url(base_url: str | None) -> str:
    """Argument, else ``TX_BASE_URL``, else ``TINKER_BASE_URL``, else the local tx default."""
    url = base_url or os.environ.get("TX_BASE_URL") or os.environ.get("TINKER_BASE_URL")
    return (url or DEFAULT_BASE_URL).rstrip("/")


def resolve_api_key(api_key: str | None) -> str:
    """Argument, else ``TX_API_KEY``, else ``TINKER_API_KEY``; must start with ``tml-``."""
    key = api_key or os.environ.get("TX_API_KEY") or os.environ.get("TINKER_API_KEY")
    if not key:
        raise TinkerError(
            "api_key is required: pass api_key=... or set TX_API_KEY (or TINKER_API_KEY)"
        )
    if not key.startswith(("tml-", "eyJ")):
        raise TinkerError("The api_key must start with the 'tml-' prefix")
    return key


def is_retryable_status(response: httpx.Response) -> bool:
    """408/409/429/≥500, overridden by an explicit ``x-should-retry`` header."""
    should = response.headers.get("x-should-retry")
    if should == "true":
        return True
    if should == "false":
        return False
    code = response.status_code
    return code in (408, 409, 429) or code >= 500


def _retry_after(headers: httpx.Headers) -> float | None:
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return None if parsed is None else parsed.timestamp() - time.time()


def retry_delay(attempt: int, headers: httpx.Headers | None = None) -> float:
    """Seconds to sleep before retry number ``attempt`` (0-based), per the module policy."""
    if headers is not None:
        hinted = _retry_after(headers)
        if hinted is not None and 0 < hinted <= 60:
            return hinted
    delay = min(_INITIAL_RETRY_DELAY * 2.0**attempt, _MAX_RETRY_DELAY)
    return delay * (1.0 - 0.25 * random.random())


class Transport:
    """An ``httpx.AsyncClient`` bound to one server and credential (created lazily, on the
    background loop, so it is never shared across event loops)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        max_retries: int = DEFAULT_MAX_RETRIES,
        timeout: float = DEFAULT_TIMEOUT,
        default_headers: Mapping[str, str] | None = None,
        retry_window: float = DEFAULT_RETRY_WINDOW,
    ) -> None:
        self.base_url = resolve_base_url(base_url)
        self.api_key = resolve_api_key(api_key)
        self.max_retries = max_retries
        self.retry_window = retry_window
        self.timeout = timeout
        self.default_headers = dict(default_headers or {})
        self.closed = False
        """Set when the owning ServiceClient is closed: every later request fails at once."""
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.base_url,
                follow_redirects=True,
                timeout=httpx.Timeout(self.timeout, connect=5.0),
            )
        return self._client

    def _headers(self, method: str, extra: Mapping[str, str] | None) -> dict[str, str]:
        headers = {
            "X-API-Key": self.api_key,
            "Accept": "application/json",
            "User-Agent": f"tx-client (tinker-compatible {SDK_VERSION})",
            **self.default_headers,
        }
        if method != "GET":
            headers["Content-Type"] = "application/json"
            headers["X-Idempotency-Key"] = f"stainless-python-retry-{uuid.uuid4()}"
        headers.update(extra or {})
        return headers

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, Any] | None = None,
        max_retries: int | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        """Send one call (with retries); return the 2xx response or raise a typed error.

        After the owning ServiceClient was closed this raises ``RuntimeError`` without a
        request, as the official SDK does (it only does so after ~30 s; the server would
        reject the finished session's work anyway).
        """
        if self.closed:
            raise RuntimeError("ServiceClient is closed")
        retries = self.max_retries if max_retries is None else max_retries
        sent_headers = self._headers(method, headers)
        url = f"/api/v1/{path.lstrip('/')}"
        clean_params = {k: v for k, v in (params or {}).items() if v is not None}
        request_timeout = httpx.Timeout(timeout, connect=5.0) if timeout is not None else None
        attempt = 0
        started = time.monotonic()
        while True:
            sent_headers["x-stainless-retry-count"] = str(attempt)
            request = self._http().build_request(
                method,
                url,
                json=json if content is None else None,
                content=content,
                headers=sent_headers,
                params=clean_params,
                timeout=request_timeout or self._http().timeout,
            )
            try:
                response = await self._http().send(request)
            except httpx.TimeoutException as exc:
                if attempt >= retries:
                    raise APITimeoutError(request) from exc
                await asyncio.sleep(retry_delay(attempt))
            except httpx.TransportError as exc:
                if attempt >= retries:
                    raise APIConnectionError(request, f"Connection error: {exc}") from exc
                await asyncio.sleep(retry_delay(attempt))
            else:
                if response.is_success:
                    return response
                backpressure = (
                    response.status_code == 429
                    and retries > 0
                    and time.monotonic() - started < self.retry_window
                )
                if not is_retryable_status(response) or (attempt >= retries and not backpressure):
                    raise status_error(response)
                await asyncio.sleep(retry_delay(attempt, response.headers))
            attempt += 1

    def request_sync(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Blocking form of :meth:`request` (runs it on the background loop)."""
        return submit(self.request(method, path, **kwargs)).result()

    async def aclose(self) -> None:
        """Close the connection pool (the transport can be used again afterwards)."""
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()
