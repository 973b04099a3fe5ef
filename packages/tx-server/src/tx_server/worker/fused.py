"""One policy for a fused engine call that serves several requests (training passes, samples).

The call runs once for all requests. If the engine rejects the batch as bad *user* input, every
request is rerun alone, so only the offending one fails and the others still get results; any
other failure fails the whole batch (it says nothing about one request). Training and sampling
share this so the two paths can never drift apart on what a tenant's bad input costs others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

from tx_engine.errors import TxEngineError

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


def run_fused(
    items: Sequence[Item],
    call: Callable[[Sequence[Item]], Sequence[Result]],
    fail: Callable[[Item, BaseException], None],
    complete: Callable[[Item, Result], None],
) -> None:
    """``call`` on all ``items``; isolate on a user error; ``complete`` or ``fail`` each item."""
    try:
        results = call(items)
    except TxEngineError as exc:
        if len(items) > 1 and exc.category == "user":
            for item in items:  # isolate the bad request; the others still run
                run_fused([item], call, fail, complete)
            return
        for item in items:
            fail(item, exc)
        return
    except Exception as exc:
        log.exception("fused engine call failed")
        for item in items:
            fail(item, exc)
        return
    for item, result in zip(items, results, strict=True):
        complete(item, result)
