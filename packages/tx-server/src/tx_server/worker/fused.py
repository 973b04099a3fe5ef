"""One policy for a fused engine call that serves several requests (training passes, samples).

The call runs once for all requests. If the engine rejects the batch as bad *user* input, every
request is rerun alone, so only the offending one fails and the others still get results; any
other failure fails the whole batch (it says nothing about one request). Training and sampling
share this so the two paths can never drift apart on what a tenant's bad input costs others.

:func:`run_fused_later` splits the same policy at the engine's dispatch/fetch boundary: the
engine checks its input when the call is dispatched (so isolation happens then), and results
are fetched and handed out when the returned function is called — after the caller has
dispatched more work, so the device never waits for the host's bookkeeping.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

from tx_engine.errors import TxEngineError

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")
Collect = Callable[[], None]


def run_fused(
    items: Sequence[Item],
    call: Callable[[Sequence[Item]], Sequence[Result]],
    fail: Callable[[Item, BaseException], None],
    complete: Callable[[Item, Result], None],
) -> None:
    """``call`` on all ``items``; isolate on a user error; ``complete`` or ``fail`` each item."""

    def call_later(group: Sequence[Item]) -> Callable[[], Sequence[Result]]:
        results = call(group)
        return lambda: results

    run_fused_later(items, call_later, fail, complete)()


def run_fused_later(
    items: Sequence[Item],
    call_later: Callable[[Sequence[Item]], Callable[[], Sequence[Result]]],
    fail: Callable[[Item, BaseException], None],
    complete: Callable[[Item, Result], None],
) -> Collect:
    """Dispatch ``call_later`` on all ``items`` now (isolating bad input as :func:`run_fused`
    does); the returned function fetches the results and completes or fails each item."""
    try:
        fetch = call_later(items)
    except TxEngineError as exc:
        if len(items) > 1 and exc.category == "user":
            # isolate the bad request; the others still run
            parts = [run_fused_later([item], call_later, fail, complete) for item in items]
            return lambda: collect_all(parts)
        for item in items:
            fail(item, exc)
        return _nothing
    except Exception as exc:
        log.exception("fused engine call failed")
        for item in items:
            fail(item, exc)
        return _nothing

    def collect() -> None:
        try:
            results = fetch()
        except Exception as exc:
            log.exception("fused engine call failed")
            for item in items:
                fail(item, exc)
            return
        for item, result in zip(items, results, strict=True):
            complete(item, result)

    return collect


def collect_all(collectors: Sequence[Collect]) -> None:
    """Fetch and record, in order, what the collectors' engine calls produced."""
    for collect in collectors:
        collect()


def _nothing() -> None:
    return None
