"""Per-model request numbering and turn-taking (spec §3.8), and the two-phase call shape.

Each TrainingClient call reserves consecutive request ids *in the caller's thread*, so ids
follow call order (``seq_id = id + 1``; one id per forward/backward chunk, two per chunk for a
custom loss). On the background loop a call's POSTs wait for their *turn* — every lower id has
been POSTed — so operations pipeline (``forward_backward`` then ``optim_step`` return two
futures at once) while the server still receives them in call order. A failed or abandoned
submission still ends its turn, so later calls never hang; the server simply sees a gap in the
``seq_id``s, which the protocol requires it to tolerate.

A call is two phases: *submission* (POSTs in turn; returns request ids) and *collection*
(polling). Sync methods return an ``APIFuture`` of both; ``*_async`` methods await the
submission and return an ``APIFuture`` of the collection, like the official SDK.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from tx_client._futures import APIFuture
from tx_client._loop import run_async

__all__ = ["RequestSequencer", "TwoPhase", "run_two_phase", "run_two_phase_async"]

S = TypeVar("S")
T = TypeVar("T")
TwoPhase = tuple[Coroutine[Any, Any, S], Callable[[S], Coroutine[Any, Any, T]]]


class RequestSequencer:
    """Hands out request ids and runs POSTs in id order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next_id = 0
        self._posted = 0  # every id below this has been POSTed (or abandoned)
        self._turns: asyncio.Condition | None = None  # created on the background loop

    def reserve(self, count: int) -> int:
        """Reserve ``count`` consecutive ids; returns the first."""
        with self._lock:
            start, self._next_id = self._next_id, self._next_id + count
            return start

    def _condition(self) -> asyncio.Condition:
        if self._turns is None:
            self._turns = asyncio.Condition()
        return self._turns

    async def in_turn(self, start: int, end: int, post: Callable[[], Awaitable[S]]) -> S:
        """Run ``post`` once ids < ``start`` are posted; afterwards mark ids < ``end`` posted."""
        turns = self._condition()
        async with turns:
            await turns.wait_for(lambda: self._posted >= start)
        try:
            return await post()
        finally:
            async with turns:
                self._posted = max(self._posted, end)
                turns.notify_all()

    async def skip(self, start: int, end: int) -> None:
        """Give up ids ``[start, end)`` (after a client-side failure) in their turn."""
        await self.in_turn(start, end, _nothing)


async def _nothing() -> None:
    return None


def run_two_phase(
    submission: Coroutine[Any, Any, S], collect: Callable[[S], Awaitable[T]]
) -> APIFuture[T]:
    """Sync form: one future for submission then collection."""

    async def both() -> T:
        return await collect(await submission)

    return APIFuture.from_coroutine(both())


async def run_two_phase_async(
    submission: Coroutine[Any, Any, S], collect: Callable[[S], Coroutine[Any, Any, T]]
) -> APIFuture[T]:
    """Async form: await the submission, return a future of the result."""
    submitted = await run_async(submission)
    return APIFuture.from_coroutine(collect(submitted))
