"""Sampling requests: resolve each sampler to weights in a slot, batch, generate, encode.

A sampling session names a base model and, optionally, a checkpoint directory (resolved by the
API when the request was queued). The checkpoint is loaded once into a free adapter slot of the
base model's engine and kept there, keyed by its path, until the slot is needed by another
sampler checkpoint or a training run (least recently used first; :mod:`.slots`). Loading from disk is what makes an unnamed
``save_weights_for_sampler`` a frozen snapshot: the training run keeps its own slot, and its
later steps never touch the sampler's copy.

How sampling and training share the one worker: the queue hands out requests in arrival
order, of every type, up to the claim limit, and :class:`~tx_server.worker.executor.Executor`
runs one claim as one fused training batch per engine and then one sampling batch per engine
(this module). The next claim again takes whatever arrived first. So the two alternate, and
what is submitted while a sampling batch decodes does not wait for all of it: training runs
between two decode steps, up to a share of the time, and sample requests join the batch's free
rows (:mod:`tx_server.worker.interleave`). Neither can starve the other.

All sample requests of a claim — of every tenant and sampler on one base model — go into one
:meth:`Sampler.sample` call. If the engine refuses the batch as bad input, each request is rerun
alone, so one tenant's bad request fails only that request. Each request is answered as soon as
its own samples are done (``on_ready``), so a short request does not wait for the longest one
it was batched with; a failure later in the call fails only the requests not answered yet.

A request whose sampler checkpoint finds every adapter slot taken by samplers that requests
before it read (more distinct samplers in a claim, or joining a batch, than slots) waits for
those batches to end and runs after them, in the same claim, instead of failing
(:class:`~tx_server.worker.engines.SlotsBusyError`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tx_engine.sampler import Interruption, Sampler, SampleRequestArrays, SampleResult
from tx_server import convert
from tx_server.errors import category_of
from tx_server.futures import PROTOBUF, RequestType
from tx_server.settings import Settings
from tx_server.work_queue import ClaimedRequest, WorkQueue
from tx_server.worker.engines import EngineHost, SlotsBusyError
from tx_server.worker.fused import run_fused
from tx_types import SampleRequest
from tx_types.proto import encode_sample_response

__all__ = ["SamplingRunner"]

log = logging.getLogger(__name__)
_MAX_BATCH = 64


@dataclass(frozen=True)
class _Active:
    """The engine call in progress: its sampler and the jobs of its result indices."""

    sampler: Sampler
    base_model: str
    members: list[_Job]


@dataclass(frozen=True)
class _Job:
    request: ClaimedRequest
    body: SampleRequest
    base_model: str
    arrays: SampleRequestArrays


class SamplingRunner:
    """Runs claimed ``sample`` requests and records each outcome in the queue."""

    def __init__(self, settings: Settings, host: EngineHost, queue: WorkQueue) -> None:
        self.settings = settings
        self.host = host
        self.queue = queue
        self._samplers: dict[str, Sampler] = {}
        self._groups: dict[str, list[_Job]] = {}  # of the claim being run, not started yet
        self._pinned: set[int] = set()  # sampler slots the claim reads
        self._active: _Active | None = None  # the engine call in progress
        self._joined: list[ClaimedRequest] = []  # claimed by join_pending during this run
        self._slots_busy: list[ClaimedRequest] = []  # to run once the pinned samplers may go

    def run(
        self, claimed: Sequence[ClaimedRequest], interruption: Interruption | None = None
    ) -> list[ClaimedRequest]:
        """Execute every sample request of one claim: one engine call per base model. Return
        the requests that joined it (also completed or failed).

        ``interruption`` may run between decode steps, and add requests with
        :meth:`join_pending`; the sampler slots read are pinned meanwhile.
        """
        self._joined, todo = [], list(claimed)
        while todo:
            self._groups, self._pinned, self._slots_busy = {}, set(), []
            with self.host.samplers.pinned(self._pinned):
                for req in todo:
                    if (job := self._prepared(req)) is not None:
                        self._later(job)
                while self._groups:  # joins may add groups of other base models
                    base_model = next(iter(self._groups))
                    jobs = self._groups.pop(base_model)
                    self._run_group(self.sampler(base_model), jobs, interruption)
            todo = self._slots_busy
            if todo:
                log.info("%d sample requests that found no free adapter slot run now", len(todo))
        return self._joined

    @property
    def join_room(self) -> int:
        """How many requests :meth:`join_pending` would start at once (decode rows free, or
        that the batch may grow by)."""
        return 0 if self._active is None else self._active.sampler.free_rows

    def join_pending(self, limit: int) -> int:
        """Claim up to ``limit`` pending sample requests into the engine call in progress
        (between its decode steps); the number claimed.

        A request on the call's base model joins it (:meth:`Sampler.join`); one on another
        base model runs after it, in this claim. A bad one fails alone.
        """
        active = self._active
        claimed = self.queue.claim_pending(limit, request_types=(RequestType.SAMPLE,))
        self._joined += claimed
        for req in claimed:
            job = self._prepared(req)
            if job is None:
                continue
            if active is None or job.base_model != active.base_model:
                self._later(job)
                continue
            try:
                active.sampler.join(job.arrays)
            except Exception as exc:
                self._fail(req, exc)
                continue
            active.members.append(job)
            log.info("sample request %s joined a running batch", req.request_id)
        return len(claimed)

    def _prepared(self, req: ClaimedRequest) -> _Job | None:
        """``req`` prepared (its sampler checkpoint loaded and pinned), or None if it failed
        or must wait for the pinned samplers (see the module docstring)."""
        try:
            return self._prepare(req)
        except SlotsBusyError as exc:
            if self._pinned:  # they go once this claim's batches so far are done
                self._slots_busy.append(req)
            else:
                self._fail(req, exc)
        except Exception as exc:
            self._fail(req, exc)
        return None

    def _later(self, job: _Job) -> None:
        """Run ``job`` in its base model's engine call of this claim (not started yet)."""
        self._groups.setdefault(job.base_model, []).append(job)

    def sampler(self, base_model: str) -> Sampler:
        """The sampler of a served base model's engine, built on first use."""
        if base_model not in self._samplers:
            engine = self.host.engine(base_model)
            self._samplers[base_model] = Sampler(
                engine,
                max_cache_tokens=self.settings.engine.sample_tokens_per_batch,
                max_batch=_MAX_BATCH,
                decode_fn=_decoder(engine.model_dir),
                prefix_cache_tokens=self.settings.engine.sample_prefix_cache_tokens,
                decode_chunk=self.settings.engine.sample_decode_chunk,
                max_sequence_tokens=self.settings.engine.max_seq_len,  # the advertised context
            )
        return self._samplers[base_model]

    def _prepare(self, req: ClaimedRequest) -> _Job:
        data = json.loads(req.payload)
        body = SampleRequest.model_validate(data["request"])
        base_model = str(data["base_model"])
        engine = self.host.engine(base_model)
        slot = None
        if data.get("storage_path") is not None:
            slot = self.host.samplers.slot(base_model, engine, str(data["storage_path"]))
            self._pinned.add(slot)
        return _Job(req, body, base_model, convert.sample_request_arrays(body, slot))

    def _run_group(
        self, sampler: Sampler, jobs: list[_Job], interruption: Interruption | None
    ) -> None:
        answered: set[str] = set()

        def answer(ready: Sequence[tuple[_Job, SampleResult]]) -> None:
            done = [
                (job.request.request_id, _encode(job, result), PROTOBUF) for job, result in ready
            ]
            self.queue.complete_many(done)
            answered.update(request_id for request_id, _, _ in done)

        def sample(group: Sequence[_Job]) -> list[SampleResult]:
            active = self._active = _Active(sampler, group[0].base_model, list(group))
            cache = sampler.prefix_cache
            hits, reused = (cache.hits, cache.reused_tokens) if cache else (0, 0)
            try:
                results = sampler.sample(
                    [j.arrays for j in group],
                    on_ready=lambda pairs: answer([(active.members[i], r) for i, r in pairs]),
                    interruption=interruption,
                )
                if cache is not None and cache.hits > hits:
                    log.info(
                        "prefix cache: %d prompts reused kept prefixes, %d tokens in all",
                        cache.hits - hits,
                        cache.reused_tokens - reused,
                    )
            except BaseException as exc:
                for job in active.members[len(group) :]:  # joined: unknown to run_fused
                    fail(job, exc)
                raise
            finally:
                self._active = None
            return results[: len(group)]  # the joined ones were answered by on_ready

        def fail(job: _Job, exc: BaseException) -> None:
            if job.request.request_id not in answered:  # a later failure keeps given answers
                self._fail(job.request, exc)

        def complete(job: _Job, result: SampleResult) -> None:
            # Nothing left to record: the sampler hands every result to on_ready before it
            # returns, and answer() recorded it then.
            assert job.request.request_id in answered, "a result bypassed on_ready"

        run_fused(jobs, sample, fail, complete)

    def _fail(self, req: ClaimedRequest, exc: BaseException) -> None:
        self.queue.fail_claimed(req, exc, category_of(exc))


def _encode(job: _Job, result: SampleResult) -> bytes:
    return encode_sample_response(convert.sample_response(job.body, result))


def _decoder(model_dir: Path) -> Callable[[Sequence[int]], str] | None:
    """Token ids → text for stop strings, from the model's ``tokenizer.json`` if it has one."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))

    def decode(ids: Sequence[int]) -> str:
        return str(tokenizer.decode(list(ids), skip_special_tokens=False))

    return decode
