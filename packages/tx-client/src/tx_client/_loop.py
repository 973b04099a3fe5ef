"""One background event loop per process that runs all of tx-client's network I/O.

Why: the public API is synchronous *and* awaitable (``fut.result()`` and ``await fut``), calls
must pipeline (a submission returns before its result exists), and the heartbeat must run while
user code blocks. Running every coroutine on one daemon-thread loop gives all three with a
single ``httpx.AsyncClient`` per transport: sync callers block on a
``concurrent.futures.Future``; async callers await it through ``asyncio.wrap_future`` on their
own loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["in_background_loop", "run_async", "submit"]

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def _background_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="tx-client-loop", daemon=True)
            thread.start()
            _loop = loop
        return _loop


def in_background_loop() -> bool:
    """True when called from the background loop's thread (blocking there would deadlock)."""
    try:
        return asyncio.get_running_loop() is _loop
    except RuntimeError:
        return False


def submit(coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    """Schedule ``coro`` on the background loop; returns at once."""
    return asyncio.run_coroutine_threadsafe(coro, _background_loop())


async def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` from any event loop (it runs on the background loop)."""
    if in_background_loop():
        return await coro
    return await asyncio.wrap_future(submit(coro))
