"""``optim_step`` requests: every tenant's step of one claim in one engine call per base model.

Why fuse: with many tenants the optimizer is a per-request fixed cost (a dispatch, a
device-to-host copy of the metrics, a sync) that one :meth:`TrainingEngine.optim_steps` call
pays once for all slots. Safe because the queue claims at most one barrier per model and none
of its passes with it (:mod:`tx_server.work_queue`), so the steps of one claim are of distinct
models and commute. Bad input (a rejected hyperparameter) is isolated by
:func:`~tx_server.worker.fused.run_fused`: only that tenant's step fails.

Once the step is dispatched the run is marked for a recovery snapshot (:mod:`.snapshots`: cut
and written when the worker is idle); the future completes with the step's metrics when the
executor collects them (:mod:`.executor`).

A step the engine skipped because its gradient or update was not finite (``skipped``, see
:mod:`tx_engine.optim`: the adapter is unchanged, the gradient spent) is answered with a
``user`` error that says so. Its row is still *completed*, with that error as its result
body (what ``retrieve_future`` returns for a failed request, so the SDK raises
``RequestFailedError``): the step did run, and restart recovery must replay it to spend the
same gradient (:mod:`.recovery` replays completed requests only).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tx_server import convert
from tx_server.errors import BadRequestError
from tx_server.futures import JSON
from tx_server.work_queue import ClaimedRequest, WorkQueue
from tx_server.worker.engines import EngineHost, LoadedModel
from tx_server.worker.fused import Collect, collect_all, run_fused_later
from tx_types import (
    AdamParams,
    OptimStepRequest,
    OptimStepResponse,
    RequestErrorCategory,
    RequestFailedResponse,
)

__all__ = ["OptimStep", "dispatch_optim_steps", "prepare_optim_step"]

log = logging.getLogger(__name__)

_SKIPPED = (
    "optim_step: the accumulated gradient, or the update it gives at this learning rate, is "
    "not finite (NaN or inf), so the step was skipped: the adapter's weights and optimizer "
    "state are unchanged and the gradient was discarded. Check the forward_backward inputs "
    "(weights, advantages, logprobs: a loss of inf or NaN) and adam_params.learning_rate."
)


@dataclass(frozen=True)
class OptimStep:
    """A claimed ``optim_step`` with its run and AdamW hyperparameters resolved."""

    request: ClaimedRequest
    model_id: str
    model: LoadedModel
    params: AdamParams


def prepare_optim_step(host: EngineHost, req: ClaimedRequest) -> OptimStep:
    """Decode the request and find (or restore) its run; raises for bad requests."""
    body = OptimStepRequest.model_validate_json(req.payload)
    if not isinstance(body.optim_params, AdamParams):
        raise BadRequestError("optim_step: only adam_params (AdamW) are supported")
    return OptimStep(req, body.model_id, host.get(body.model_id), body.optim_params)


def dispatch_optim_steps(
    host: EngineHost,
    queue: WorkQueue,
    steps: Sequence[OptimStep],
    fail: Callable[[ClaimedRequest, BaseException], None],
) -> Collect:
    """Dispatch ``steps`` (one claim round's) with one engine call per engine; the returned
    function fetches the metrics and records every outcome in one transaction.

    Each run is marked for a recovery snapshot as soon as its step is dispatched, not when the
    metrics arrive: from then on the engine holds the stepped state, and a snapshot cut in
    between (the slot evicted, the lag deadline) must say which step it contains.
    """
    groups: dict[int, list[OptimStep]] = {}
    for s in steps:
        groups.setdefault(id(s.model.engine), []).append(s)

    def call_later(group: Sequence[OptimStep]) -> Callable[[], list[dict[str, float]]]:
        engine = group[0].model.engine
        models = ", ".join(sorted(s.model_id for s in group))
        log.info("one optim_step engine call for %d models: %s", len(group), models)
        fetch = engine.optim_steps_later(
            {s.model.slot: convert.adam_params(s.params) for s in group}
        )
        for s in group:
            host.snapshot(s.model_id, s.request.request_id)

        def metrics() -> list[dict[str, float]]:
            by_slot = fetch()
            return [by_slot[s.model.slot] for s in group]

        return metrics

    done: list[tuple[str, bytes, str]] = []

    def complete(s: OptimStep, metrics: dict[str, float]) -> None:
        if metrics.pop("skipped", 0.0):
            log.warning("optim_step of model %s skipped: not finite", s.model_id)
            failed = RequestFailedResponse(error=_SKIPPED, category=RequestErrorCategory.User)
            done.append((s.request.request_id, failed.model_dump_json().encode(), JSON))
            return
        finite = {k: v for k, v in metrics.items() if math.isfinite(v)}  # JSON has no NaN/inf
        body = OptimStepResponse(metrics=finite).model_dump_json().encode()
        done.append((s.request.request_id, body, JSON))

    parts = [
        run_fused_later(group, call_later, lambda s, exc: fail(s.request, exc), complete)
        for group in groups.values()
    ]

    def collect() -> None:
        collect_all(parts)
        queue.complete_many(done)

    return collect
