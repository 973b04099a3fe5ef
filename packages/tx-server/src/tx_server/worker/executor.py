"""Execute one claimed batch, round by round: fuse every forward/backward pass and optimizer
step of a round, run its other barriers; then sample.

Why fusing is safe: a round holds at most one barrier (optim_step, save, load, create) per
model, as that model's last request in the round (:mod:`.rounds`), and forward/backward passes
of one model between two barriers commute. So all passes of a round — of every tenant — can
run in one engine call per (base model, forward-only?) pair, results split back per request. If a fused call is refused
as bad input, each request is rerun alone so one tenant's bad batch fails only that tenant.
Sample requests of the claim are then run as one batch per base model
(:mod:`tx_server.worker.sampling`, which also explains how training and sampling alternate);
what is submitted meanwhile runs between their decode steps (:mod:`tx_server.worker.interleave`).

A request that runs between decode steps but finds every adapter slot taken by its round's
runs and by samplers the batch reads (:class:`~.engines.SlotsBusyError`) waits for the batch to
end instead of failing: it runs right after, when those samplers may go, with every later
request of its model (they stay claimed meanwhile, so the queue hands out nothing of that model
that must follow them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tx_engine.batching import AdapterBatch, GroupOutput
from tx_engine.errors import InputError
from tx_server import convert
from tx_server.errors import WireCategory, category_of
from tx_server.futures import JSON, PROTOBUF, RequestType
from tx_server.settings import Settings
from tx_server.wake import SyncSubscription
from tx_server.work_queue import ClaimedRequest, WorkQueue
from tx_server.worker.engines import EngineHost, LoadedModel, SlotsBusyError
from tx_server.worker.fused import Collect, collect_all, run_fused_later
from tx_server.worker.handlers import BarrierHandlers
from tx_server.worker.interleave import DecodeBreaks
from tx_server.worker.optim_steps import dispatch_optim_steps, prepare_optim_step
from tx_server.worker.passes import decode_pass
from tx_server.worker.rounds import plan_rounds
from tx_server.worker.sampling import SamplingRunner
from tx_types.proto import ProtoDecodeError
from tx_types.proto import encode_forward_backward_output as encode_output

__all__ = ["HANDLED_TYPES", "Executor"]

log = logging.getLogger(__name__)

_PASSES = frozenset({RequestType.FORWARD, RequestType.FORWARD_BACKWARD})
HANDLED_TYPES = frozenset(
    _PASSES
    | {
        RequestType.CREATE_MODEL,
        RequestType.OPTIM_STEP,
        RequestType.SAVE_WEIGHTS,
        RequestType.SAVE_WEIGHTS_FOR_SAMPLER,
        RequestType.LOAD_WEIGHTS,
        RequestType.SAMPLE,
        RequestType.UNLOAD_MODEL,
    }
)
"""What this worker claims (every type it has a handler for)."""
_TRAINING_TYPES = HANDLED_TYPES - {RequestType.SAMPLE}
"""What may run between the decode steps of a sampling batch."""
_BREAK_CLAIM_LIMIT = 64


@dataclass(frozen=True)
class _Pass:
    request: ClaimedRequest
    model: LoadedModel
    batch: AdapterBatch
    backward: bool


def failure_category(exc: BaseException) -> WireCategory:
    """User for bad input (decoding, engine input errors), else per the error table.

    A pydantic ValidationError here is a server bug: payloads were validated by the route.
    """
    if isinstance(exc, ProtoDecodeError):
        return "user"
    return category_of(exc)


class Executor:
    """Runs claimed requests on the engines and records each outcome in the queue."""

    def __init__(self, settings: Settings, queue: WorkQueue) -> None:
        self.settings = settings
        self.queue = queue
        self.host = EngineHost(settings, queue.db)
        self.handlers = BarrierHandlers(self.host, queue.db, settings.checkpoint_root).table()
        self.sampling = SamplingRunner(settings, self.host, queue)
        self.engine_calls = 0
        """Forward/backward engine calls made so far (how well requests were fused)."""
        self._after_batch: list[ClaimedRequest] | None = None
        """While a sampling batch runs: requests of decode breaks that wait for its end."""
        self._waiting_models: set[str] = set()
        """Models with a request in ``_after_batch``: their later requests wait too."""

    def sweep(self) -> None:
        """Free the slots of runs that stopped being live (call between claims, never within).

        Within a claim a pass may already hold its run's slot; freeing it mid-claim could hand
        the slot to another run before the pass executes.
        """
        try:
            self.host.sweep()
        except Exception:  # a failed sweep only delays freeing; the next one retries
            log.exception("sweeping released adapter slots failed")

    def run(
        self, claimed: Sequence[ClaimedRequest], work: SyncSubscription | None = None
    ) -> list[ClaimedRequest]:
        """Execute ``claimed`` (one claim's worth) and complete or fail every request; return
        the sample requests answered: the claim's and those that joined its sampling meanwhile.

        The claim's training requests run in rounds (:func:`plan_rounds`), its samples after.
        With the worker's ``work`` subscription, training submitted while the samples decode
        runs between their decode steps, and sample requests join them (:class:`DecodeBreaks`).
        """
        training = [r for r in claimed if r.request_type != RequestType.SAMPLE]
        self._run_training(training)
        samples = [r for r in claimed if r.request_type == RequestType.SAMPLE]
        if not samples:
            return []
        breaks = None
        if work is not None:
            breaks = DecodeBreaks(
                work,
                claim=lambda: self.queue.claim_pending(
                    _BREAK_CLAIM_LIMIT, request_types=_TRAINING_TYPES, through_barriers=True
                ),
                execute=self._run_training,
                share=self.settings.training_share_while_sampling,
                room=lambda: self.sampling.join_room,
                join=self.sampling.join_pending,
                training_wanted=bool(training),
            )
        self._after_batch = []
        try:
            joined = self.sampling.run(samples, breaks)
        finally:
            waiting, self._after_batch = self._after_batch, None
            self._waiting_models.clear()
        if waiting:
            log.info(
                "%d requests that found no free adapter slot run after the sampling batch",
                len(waiting),
            )
            self._run_training(waiting)
        if breaks is not None:
            breaks.raise_failure()
        return samples + joined

    def _run_training(self, training: Sequence[ClaimedRequest]) -> None:
        pending: list[Collect] = []
        try:
            limit, held = self.settings.engine.max_lora_adapters, self.host.find
            for requests in plan_rounds(training, limit, lambda m: held(m) is not None):
                pending = self._run_round(requests, pending)
            collect_all(pending)
        finally:
            self.host.begin_round(set())  # the claim's training is over: any run may be parked

    def _run_round(
        self, requests: Sequence[ClaimedRequest], earlier: Sequence[Collect]
    ) -> list[Collect]:
        """One round: every pass (fused per engine), then the optimizer steps (fused), then the
        other barriers; a model has at most one barrier in a round, after its passes.

        The device never waits for the host's bookkeeping: the previous round's optimizer
        results (``earlier``) are recorded while this round's passes compute, and the passes'
        while this round's steps compute. Outcomes are still recorded in each model's order.
        Returns this round's step collectors, for the next round (or the end of the claim).

        A run that must be restored into a slot may park another (:mod:`.engines`): the
        previous round's steps are collected first then, so no run is parked mid-step.
        """
        models = {r.model_id for r in requests if r.model_id is not None}
        if any(self.host.find(m) is None for m in models):
            collect_all(earlier)
            earlier = []
        self.host.begin_round(models)
        passes: list[_Pass] = []
        for req in requests:
            if req.request_type in _PASSES and not self._waits(req):
                try:
                    passes.append(self._prepare(req))
                except Exception as exc:
                    self._fail(req, exc)
        groups: dict[tuple[int, bool], list[_Pass]] = {}
        for p in passes:
            groups.setdefault((id(p.model.engine), p.backward), []).append(p)
        pass_results = [self._dispatch_passes(group) for group in groups.values()]
        collect_all(earlier)
        steps = []
        for req in requests:
            if req.request_type == RequestType.OPTIM_STEP and not self._waits(req):
                try:
                    steps.append(prepare_optim_step(self.host, req))
                except Exception as exc:
                    self._fail(req, exc)
        step_results = (
            [dispatch_optim_steps(self.host, self.queue, steps, self._fail)] if steps else []
        )
        collect_all(pass_results)
        others = [r for r in requests if r.request_type not in _PASSES | {RequestType.OPTIM_STEP}]
        if others:  # they read and write state synchronously: record everything before them
            collect_all(step_results)
            step_results = []
            for req in others:
                if not self._waits(req):
                    self._run_barrier(req)
        return step_results

    def _prepare(self, req: ClaimedRequest) -> _Pass:
        decoded = decode_pass(req.payload, self.settings.engine.max_seq_len)
        model = self.host.get(decoded.model_id)
        return _Pass(req, model, decoded.batch(model.slot), backward=decoded.backward)

    def _dispatch_passes(self, passes: list[_Pass]) -> Collect:
        engine = passes[0].model.engine
        run_later = engine.forward_backward_later if passes[0].backward else engine.forward_later

        def call_later(group: Sequence[_Pass]) -> Callable[[], Sequence[GroupOutput]]:
            self.engine_calls += 1
            models = sorted({str(p.request.model_id) for p in group})
            log.info(
                "one %s engine call for %d requests of %d models: %s",
                "forward_backward" if group[0].backward else "forward",
                len(group),
                len(models),
                ", ".join(models),
            )
            return run_later([p.batch for p in group])

        done: list[tuple[str, bytes, str]] = []

        def complete(p: _Pass, out: GroupOutput) -> None:
            body = encode_output(convert.forward_backward_output(out))
            done.append((p.request.request_id, body, PROTOBUF))

        fetch = run_fused_later(passes, call_later, lambda p, e: self._fail(p.request, e), complete)

        def collect() -> None:
            fetch()
            self.queue.complete_many(done)

        return collect

    def _run_barrier(self, req: ClaimedRequest) -> None:
        handler = self.handlers.get(req.request_type)
        try:
            if handler is None:
                raise InputError(f"request type {req.request_type!r} is not supported")
            body = handler(req)
        except Exception as exc:
            self._fail(req, exc)
            return
        self.queue.complete(req.request_id, body, JSON)

    def _fail(self, req: ClaimedRequest, exc: BaseException) -> None:
        if isinstance(exc, SlotsBusyError) and self._after_batch is not None:
            self._wait_for_batch(req)
            return
        self.queue.fail_claimed(req, exc, failure_category(exc))

    def _waits(self, req: ClaimedRequest) -> bool:
        """Whether ``req`` must wait for the sampling batch: an earlier request of its model
        does (see the module docstring)."""
        if req.model_id is None or req.model_id not in self._waiting_models:
            return False
        self._wait_for_batch(req)
        return True

    def _wait_for_batch(self, req: ClaimedRequest) -> None:
        assert self._after_batch is not None
        self._after_batch.append(req)
        if req.model_id is not None:
            self._waiting_models.add(req.model_id)
