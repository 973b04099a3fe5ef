"""Continuous batching: ``B`` decode rows over one ``S``-slot KV cache, refilled as rows finish.

:class:`ContinuousRun` is the device loop behind :class:`tx_engine.sampler.Sampler`. It keeps
a fixed set of ``B`` decode rows (one sample each) and a queue of waiting samples. Whenever rows
are free and samples wait, it *admits* the queue head into the free rows with
:func:`tx_engine.step.admit` (a prefill of the waiting prompts written into those rows of the
running cache) and keeps decoding. A short row therefore frees its row for the next sample
instead of idling until the longest row of a wave is done.

Cache layout. All rows share one write index ``i`` (the attention layer writes every row at
the same slot, so :func:`tx_engine.step.decode_step` stays one dense update). A row admitted at
index ``i`` holds its left-padded prompt at slots ``i-T .. i-1``; its ``g``-th decode step
writes slot ``i+g-1``; rope positions are per row (prompt length + step), so a row's outputs do
not depend on which slots it occupies. A live row (one still needing decode steps) therefore
occupies ``[start, end)`` with ``end = i + max_new - sent`` (``sent`` = tokens dispatched).
Admitting a group with prompt bucket ``T`` and largest ``max_new = m`` needs ``i >= T`` and
``i + m - 1 <= S``; when that fails, :func:`tx_engine.step.shift_cache` moves every row left
(or right) by ``delta`` with ``max(end, i + m - 1) - S <= delta <= min(start, i - T)``, i.e.
drops slots no live row needs. If no ``delta`` fits, the head waits for more rows to finish
(FIFO; a request alone on an empty cache always fits, so the loop always progresses).

Host/device overlap: decode dispatch ``n+1`` is sent before dispatch ``n``'s tokens are
fetched for the stop checks (one dispatch ahead); every dispatch records which rows it served,
so a row that stopped, or was refilled, between dispatch and fetch never receives a stale token.

Decode chunks: one dispatch runs up to ``decode_chunk`` decode steps
(:func:`tx_engine.step.decode_chunk`, a device loop), and the host checks stops, admits and
resizes between dispatches. A decode step of a small batch reads the weights once and does
little else, so the host's work per step (building the step's arrays, the dispatch, the fetch,
the stop checks) costs as much as the step itself or more: on 2 CPU cores, 8 steps per
dispatch sample 1.1-2.2× the tokens per second of 1 on the tiny preset and up to 1.1× on the
small one (``benchmarks/engine_sample.py --decode-chunks 1,8``), and on an accelerator, where a step
takes a fraction of a millisecond, the host is the whole cost. The price: a row that stops on
a stop token or string mid-dispatch keeps decoding (its extra tokens are dropped, as one step
ahead already did) until the dispatch ends, and a waiting sample is admitted, or an
interruption run, up to a dispatch later. So a dispatch runs several steps only while steps
are short: no more than fit :data:`DISPATCH_SECONDS` at the step time the run measures (the
time between two fetches over the steps fetched), which keeps that wait short. Where a step
takes longer (the small preset on a CPU: 7-50 ms), the host's share is small anyway, and a
dispatch runs one step. A dispatch also runs no more steps than the live row
nearest its ``max_tokens`` still needs, so a row that ends by length ends with a dispatch:
its request is handed out, and its row refilled, at the step it would be with single steps
(and no step writes past the slots the rows hold). The step count is data, so every count up
to ``decode_chunk`` shares one program. Rows get the tokens single steps give them (their
logprobs up to float32 summation order).

Shapes are bucketed (``S`` fixed per run; ``B`` and admission ``P``/``R`` rows to powers of
two, prompt bucket ``T``) and all per-row values (positions, steps, sampling values, adapters)
are arrays, so a run compiles nothing new inside its buckets.

Resizing: a run starts with the rows it needs (``B`` = its rows, to a power of two) and may
grow to ``max_batch`` rows (what the cache-token budget allows) when more samples wait than rows
are free: :func:`tx_engine.step.resize_rows` copies the cache into a larger batch, rows' slots
unchanged. So a lone long request decodes at batch 1, and a request that joins it needs no row
to free first: it starts at the next decode step instead of after the whole run. Once nothing
waits and the live rows fit half the batch, the run shrinks to them (the same copy), since a
decode step computes every row and reads every row's cache, idle or not: a long row does not
keep paying for a short joiner, or for the short rows of its own group, after they end.

Prefix reuse: with a :class:`~tx_engine.sampling.prefix_cache.PrefixCache`, each admission
leaves its prompts' keys/values there and a row that ends leaves its sequence's, and a prompt
that extends a kept sequence (the next turn of a conversation, a shared system prompt) is
admitted with that prefix as context: only the rest of the prompt is prefilled. One admission
shares one context size ``C`` (rows with another ``C`` wait for the next admission, FIFO as
always); such a row occupies ``C + T`` slots from ``start``. A prompt that shares a reusable
prefix with another prompt of the same admission waits for the next one too (one decode step
later), so the shared prefix is prefilled once.

Compiling ahead: a new shape (an admission with a new prompt bucket, number of prompts or
rows, or prompt scores; a new batch size) means a new program, and compiling it on the decode
loop's thread would stall every live row for as long as it takes (~0.6 s for an admission on
the tiny preset, 2.2 s for a decode step of the small one, tens of seconds for a large model on
a GPU). So while rows are live, such a program compiles on a background thread
(:mod:`tx_engine.step.ahead`) and the run keeps decoding: the queue head is admitted, and a
resize done, at the first step after its programs are ready. The run's admissions, decode
steps and resizes are therefore called through :data:`~tx_engine.step.ahead.PROGRAMS`. A run
with no live row compiles in place (no one waits), and so does everything with
``compile_ahead`` off, which keeps the schedule independent of compile times (tests of the
schedule use that). Rows' outputs never depend on the schedule.

Interruptions: a run of long rows decodes for seconds or minutes. An :class:`Interruption`
lets other work on the same engine (the server: training steps that arrived meanwhile) run
between two decode steps instead of after the whole run; samples that arrived meanwhile may
:meth:`~ContinuousRun.extend` the queue then, if the run :meth:`~ContinuousRun.accepts` them.
The run first fetches its step in flight, then calls the interruption, then re-reads the
engine's state: an optimizer step donates the LoRA buffers the run held, so the old arrays are
gone. The interruption may change any adapter slot except those the run samples from; the KV
cache is the run's own.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from tx_engine import step as programs
from tx_engine.engine import TrainingEngine
from tx_engine.layers.attention import KVCache
from tx_engine.layers.lora import BASE_SLOT
from tx_engine.sampling.buckets import pow2
from tx_engine.sampling.params import RowSamplingParams, SamplingRow
from tx_engine.sampling.prefix_cache import Match, PrefixCache, head
from tx_engine.sampling.stopping import StopState
from tx_engine.step.ahead import PROGRAMS, spec_like

__all__ = [
    "DEFAULT_DECODE_CHUNK",
    "DISPATCH_SECONDS",
    "ContinuousRun",
    "Interruption",
    "Job",
    "Row",
    "pow2",
]

DEFAULT_DECODE_CHUNK = 8
"""Decode steps per dispatch by default (see "Decode chunks" in the module docstring)."""

DISPATCH_SECONDS = 0.02
"""How long a decode dispatch may take when it runs several steps: what waits for the next
dispatch boundary (a joining sample, a training break, a stopped row's result) waits about this
long at most."""

_GREEDY = SamplingRow(temperature=0.0)  # what idle rows decode with: cheap, output ignored


@dataclass
class Job:
    """One validated request as the run sees it; ``scores`` is filled by its first admission.

    ``scoring`` holds the request's own (unbucketed) prompt-score sizes; ``targets`` is
    ``int32[len(prompt)-1, K]`` (-1 = not requested); ``alt_row`` the sampling row of its
    ``prompt_alt_tokens`` draws.
    """

    prompt: np.ndarray
    slot: int
    max_new: int
    prompt_t: int
    scoring: programs.Scoring
    targets: np.ndarray | None = None
    alt_row: SamplingRow | None = None
    sample_topk: int = 0
    scores: dict[str, np.ndarray] | None = None
    scores_sent: bool = False

    @property
    def owes_scores(self) -> bool:
        """Prompt scores asked for and not computed yet: the next admission prefills the
        whole prompt in a row of its own (scores come from the prefill's logits)."""
        return self.scoring.any and not self.scores_sent


@dataclass
class Row:
    """One sample of a job: what it generated so far and its stop tracker."""

    job: int
    sampling: SamplingRow
    state: StopState
    logprobs: list[float] = field(default_factory=list)
    topk: list[list[tuple[int, float]]] = field(default_factory=list)


@dataclass
class _Take:
    """An admission: queued rows that fit now, their prompts' bucket ``t``, their shared
    context size ``c`` (0 = none), the cache shift ``delta`` and each job's prefix match."""

    rows: list[Row] = field(default_factory=list)
    t: int = 0
    c: int = 0
    delta: int = 0
    matches: dict[int, Match | None] = field(default_factory=dict)
    heads: dict[tuple[int, bytes], list[int]] = field(default_factory=dict)  # (slot, head): jobs


@dataclass
class _Pending:
    """Device outputs not fetched yet, and the (output index, row) pairs they belong to.

    ``steps``: a decode dispatch's arrays have a leading step axis, of which the first
    ``steps`` were run; an admission's (0) have none: one token per admitted row.
    """

    arrays: tuple[Any, Any, Any, Any]  # tokens, logprobs, top-k ids, top-k logprobs
    rows: list[tuple[int, Row]]
    scores: programs.PromptScores | None = None
    scored: list[tuple[int, Job]] = field(default_factory=list)
    t: int = 0
    steps: int = 0


RowsDone = Callable[[list[Row]], None]


class Interruption(Protocol):
    """Other work that a run lets in between two of its decode steps."""

    def due(self) -> bool:
        """Whether to run it now; asked before every decode dispatch, so it must be cheap."""

    def run(self) -> None:
        """Run it. It may step, load or free any adapter slot but the run's own."""


class ContinuousRun:
    """Generates every row of ``rows`` (all fitting ``cache_len``) on ``batch`` decode rows.

    ``on_rows_done`` is called after each fetch with the rows that ended in it (their job's
    prompt scores are stored by then), so a caller can hand out a request's result while
    longer rows of the same run are still decoding. ``interruption``: see the module docstring.
    ``max_batch`` (a power of two, default ``batch``): the rows the run may grow to.
    ``prefix_cache``: where ended rows are kept and prompts find their prefixes.
    ``compile_ahead``: compile a new admission or batch size on a background thread while live
    rows decode (see "Compiling ahead" in the module docstring); False compiles in place,
    which makes the schedule (which step admits what) independent of compile times.
    ``decode_chunk``: the most decode steps one dispatch runs (see "Decode chunks");
    ``step_seconds``: a decode step's time as an earlier run measured it, the run's own
    estimate (:attr:`step_seconds`) until it has measured one.
    """

    def __init__(
        self,
        engine: TrainingEngine,
        jobs: list[Job],
        rows: list[Row],
        *,
        batch: int,
        cache_len: int,
        on_rows_done: RowsDone | None = None,
        interruption: Interruption | None = None,
        max_batch: int | None = None,
        prefix_cache: PrefixCache | None = None,
        compile_ahead: bool = True,
        decode_chunk: int = DEFAULT_DECODE_CHUNK,
        step_seconds: float | None = None,
    ) -> None:
        self.engine, self.jobs, self.queue = engine, jobs, deque(rows)
        self.compile_ahead, self.chunk = compile_ahead, decode_chunk
        self.prefix_cache = prefix_cache
        self.on_rows_done, self.interruption = on_rows_done, interruption
        self.batch, self.cache_len = batch, cache_len
        self.max_batch = max(batch, max_batch or batch)
        k = max((jobs[r.job].sample_topk for r in rows), default=0)
        self.sample_topk = min(pow2(k), engine.vocab_size) if k else 0
        self.owner: list[Row | None] = [None] * batch
        self.sent = [0] * batch  # tokens dispatched for the row's current owner
        self.start = [0] * batch  # the owner's first prompt slot
        self.index = 0  # host mirror of the cache's shared write index
        self.decode_steps = self.cache_shifts = self.prefilled_prompts = self.interruptions = 0
        self.resizes = self.compile_waits = self.decode_dispatches = 0
        self.step_seconds = step_seconds
        self._fetched: float | None = None  # when the last fetch returned (None: not timed)
        # One LoRA rank bucket for the whole run (the largest rank among its jobs' adapters):
        # rank-8 tenants decode at rank 8, and admitting a job never switches programs. A run
        # of base rows keeps the terms (behind decode's lora_on) so adapter rows can join it;
        # admissions of base prompts only leave them out (rank bucket 0).
        self.slots = {jobs[r.job].slot for r in rows}
        self.graphdef = engine.graphdef_for_slots(self.slots, keep_lora=True)
        self._read_state()
        self.cache = programs.empty_cache(
            self.graphdef, self.lora, self.rest, batch=batch, cache_len=cache_len
        )
        self.tokens = jnp.zeros(batch, jnp.int32)  # what the next decode step feeds
        self._refresh_rows()

    def run(self) -> None:
        """Admit, decode and collect until the queue is empty and every row is done."""
        pending: deque[_Pending] = deque()
        while True:
            if self.interruption is not None and self.decode_steps and self.interruption.due():
                self._interrupt(pending)
            admitted = bool(self.queue) and self._admit(pending)
            live = [b for b in range(self.batch) if not self._free(b)]
            if not self.queue:
                live = self._shrink(live, pending)
            if live:
                self._decode(live, pending)
            while len(pending) > (1 if live else 0):
                self._collect(pending.popleft())
            if not (live or pending or self.queue):
                return
            if not (live or admitted or pending):
                raise RuntimeError("sampler: the queue head cannot be admitted on an empty cache")

    def accepts(self, job: Job, cache_len: int) -> bool:
        """Whether ``job`` (needing ``cache_len``) can join this run without a new program:
        its cache length, sampled top-k size and adapter rank bucket fit the run's."""
        k = min(pow2(job.sample_topk), self.engine.vocab_size) if job.sample_topk else 0
        return (
            cache_len <= self.cache_len
            and k <= self.sample_topk
            and self.engine.graphdef_for_slots(self.slots | {job.slot}, keep_lora=True)
            is self.graphdef
        )

    def extend(self, rows: list[Row]) -> None:
        """Queue rows of jobs that :meth:`accepts` (appended to the shared ``jobs``)."""
        self.queue.extend(rows)
        self.slots |= {self.jobs[r.job].slot for r in rows}

    def free_rows(self) -> int:
        """Rows free now, or that growing would add, that no queued row is waiting for."""
        free = sum(self._free(b) for b in range(self.batch))
        return max(0, free + self.max_batch - self.batch - len(self.queue))

    def _read_state(self) -> None:
        # Flat, as the engine holds them: flattening the nnx states per dispatch cost ~1 ms
        # (step/flat_state.py).
        self.lora, self.rest = self.engine.flat_model_state()

    def _interrupt(self, pending: deque[_Pending]) -> None:
        """Fetch what is in flight, run the interruption, re-read the state it replaced."""
        while pending:
            self._collect(pending.popleft())
        assert self.interruption is not None
        self.interruption.run()
        self.interruptions += 1
        self._read_state()
        self._fetched = None  # the next fetch's wait is not a decode step's

    # ----------------------------------------------------------------- admission
    def _free(self, b: int) -> bool:
        row = self.owner[b]
        return row is None or row.state.done or self.sent[b] >= row.state.max_tokens

    def _shift_for(self, live: list[int], t: int, m: int) -> int | None:
        """The cache shift that lets a group (prompt bucket ``t``, ``max_new`` ``m``) in now."""
        lo = self.index + m - 1 - self.cache_len
        hi = self.index - t
        for b in live:
            row = self.owner[b]
            assert row is not None
            lo = max(lo, self.index + row.state.max_tokens - self.sent[b] - self.cache_len)
            hi = min(hi, self.start[b])
        return None if lo > hi else min(max(0, lo), hi)

    def _take(self, n_free: int, live: list[int]) -> _Take:
        """The longest queue prefix (≤ ``n_free`` rows, one context size) that fits now and
        has no prompt that should wait to reuse another's prefix (:meth:`_waits`)."""
        take = _Take()
        m = 0
        for row in self.queue:
            if len(take.rows) == n_free:
                break
            job = self.jobs[row.job]
            match = self._match(row.job)
            c = match.context if match else 0
            if take.rows and (c != take.c or (match is None and self._waits(row.job, take))):
                break
            t2 = max(take.t, match.suffix_t if match else job.prompt_t)
            m2 = max(m, job.max_new)
            if c + t2 + m2 - 1 > self.cache_len:
                break
            d = self._shift_for(live, c + t2, m2) if live else 0
            if d is None:
                break
            take.rows.append(row)
            take.matches[row.job] = match
            take.heads.setdefault((job.slot, head(job.prompt)), []).append(row.job)
            take.t, take.c, take.delta, m = t2, c, d, m2
        return take

    def _match(self, ji: int) -> Match | None:
        """The prefix of job ``ji``'s prompt that the prefix cache holds, if it is to be used.

        A job that still owes prompt scores prefills its whole prompt: they are computed from
        the prefill's logits, column by column.
        """
        job = self.jobs[ji]
        if self.prefix_cache is None or job.owes_scores:
            return None
        return self.prefix_cache.match(self._prefix_key(job.slot), job.prompt, job.prompt_t)

    def _waits(self, ji: int, take: _Take) -> bool:
        """Whether job ``ji`` should wait for the next admission: its prompt shares a reusable
        prefix with a different prompt already taken (a common system prompt, few-shot
        examples), which this admission keeps. Prefilling it next time, after one decode step,
        saves prefilling that prefix again; prompts that are equal share one prefill anyway."""
        job = self.jobs[ji]
        if self.prefix_cache is None or job.owes_scores:
            return False
        key = self._prefill_key(ji)
        return any(
            self._prefill_key(other) != key
            and self.prefix_cache.would_reuse(self.jobs[other].prompt, job.prompt, job.prompt_t)
            for other in take.heads.get((job.slot, head(job.prompt)), ())
        )

    def _prefix_key(self, slot: int) -> tuple[int, int]:
        return slot, self.engine.slot_version(slot)

    def _grow(self) -> None:
        """Add rows (to a power of two ≤ ``max_batch``) when more samples wait than rows are
        free and the extra rows could take some of them now (they fit the cache's slots)."""
        free = [b for b in range(self.batch) if self._free(b)]
        room = self.max_batch - self.batch
        if room <= 0 or len(self.queue) <= len(free):
            return
        live = [b for b in range(self.batch) if b not in free]
        chosen = self._take(len(free) + room, live).rows
        if len(chosen) <= len(free):
            return  # the head waits for slots, not rows: more rows would only idle
        batch = pow2(len(live) + len(chosen))
        if not live or self._resize_ready(batch):  # no live row: no one waits for a compile
            self._resize(list(range(self.batch)), batch)

    def _shrink(self, live: list[int], pending: deque[_Pending]) -> list[int]:
        """Drop idle rows (to the power of two ≥ the ``live`` rows) once nothing waits: every
        decode step computes, and reads the cache of, every row of the batch. The live rows'
        indices after it."""
        if not live or pow2(len(live)) >= self.batch or not self._resize_ready(pow2(len(live))):
            return live
        self._settle([b for b in range(self.batch) if b not in live], pending)
        self._resize(live, pow2(len(live)))
        return list(range(len(live)))

    def _resize(self, keep: list[int], batch: int) -> None:
        """A ``batch``-row run whose first rows are the old rows ``keep`` (slots unchanged)."""
        src = np.full(batch, -1, np.int32)
        src[: len(keep)] = keep
        self.cache, self.tokens = PROGRAMS.call(
            programs.resize_rows, {}, cache=self.cache, tokens_b=self.tokens, src_b=src
        )
        empty = batch - len(keep)
        self.owner = [self.owner[b] for b in keep] + [None] * empty
        self.sent = [self.sent[b] for b in keep] + [0] * empty
        self.start = [self.start[b] for b in keep] + [0] * empty
        self.batch = batch
        self.resizes += 1
        self._refresh_rows()

    def _admit(self, pending: deque[_Pending]) -> bool:
        """Admit the longest queue prefix that fits now; False if nothing was admitted.

        With rows decoding, a group whose admission program is not compiled yet is not
        admitted now: its program compiles on a background thread (:mod:`tx_engine.step.ahead`)
        while the rows keep decoding, and the group (still the queue head) is admitted at the
        first step after that. Alone on the cache, it compiles in place: no one is waiting.
        """
        # Before matching: keeping a row may drop the entry a match would name.
        self._settle([b for b in range(self.batch) if self._free(b)], pending)
        self._grow()
        free = [b for b in range(self.batch) if self._free(b)]
        live = [b for b in range(self.batch) if b not in free]
        take = self._take(len(free), live)
        chosen, t, c = take.rows, take.t, take.c
        if not chosen:
            return False
        index = self.index - take.delta if live else c + t  # the write index once admitted
        first: dict[tuple[Any, ...], int] = {}
        serves = [first.setdefault(self._prefill_key(r.job), r.job) for r in chosen]
        order = list(dict.fromkeys(serves))  # the jobs whose prompts are prefilled
        n_p, n_r = pow2(len(order)), pow2(len(chosen))
        src, dst = np.zeros(n_r, np.int32), np.full(n_r, self.batch, np.int32)
        for r, b in enumerate(free[: len(chosen)]):
            src[r], dst[r] = order.index(serves[r]), b
        scoring, targets, alt, scored = self._scoring(order, n_p, t)
        base_only = all(self.jobs[j].slot == BASE_SLOT for j in order)
        static = {
            "graphdef": self.engine.graphdef_for_slots(()) if base_only else self.graphdef,
            "scoring": scoring,
            "sample_topk": self.sample_topk,
        }
        context = self._context(order, n_p, take) if c else None
        args = {
            "lora": self.lora, "rest": self.rest, "prompts": self._prompts(order, n_p, t, c),
            "src_r": src, "dst_r": dst,
            "params_r": RowSamplingParams.stack([r.sampling for r in chosen], pad_to=n_r),
            "prev_tokens_b": self.tokens, "index": jnp.asarray(index, jnp.int32),
            "cache": self.cache, "targets_ptk": targets, "alt_params_p": alt,
            "pool": None if context is None else self.prefix_cache.pool,  # type: ignore[union-attr]
            "context_pc": context,
        }  # fmt: skip
        if live and not self._ready(programs.admit, static, args):
            return False
        for _ in chosen:
            self.queue.popleft()
        if live and take.delta:
            self.cache = args["cache"] = programs.shift_cache(
                self.cache, jnp.asarray(take.delta, jnp.int32)
            )
            self.cache_shifts += 1
            for b in live:
                self.start[b] -= take.delta
        self.index = index  # without live rows, the other rows' contents are never read
        for row, b in zip(chosen, free, strict=False):
            self.owner[b], self.sent[b] = row, 1
            begin = index - t - c if c else index - len(self.jobs[row.job].prompt)
            self.start[b] = begin
        for _, job in scored:
            job.scores_sent = True
        if c:
            for ji in order:
                self.prefix_cache.reuse(take.matches[ji])  # type: ignore[union-attr,arg-type]
        out = PROGRAMS.call(programs.admit, static, **args)
        self.prefilled_prompts += len(order)
        self.cache, self.tokens = out.cache, out.next_tokens_b
        if self.prefix_cache is not None:  # a later prompt may share a prefix with these
            rows = dict(zip(serves, free, strict=False))  # any row a prompt serves holds it
            self._keep([(self.jobs[ji], self.jobs[ji].prompt, rows[ji]) for ji in order])
        arrays = (out.tokens_r, out.logprobs_r, out.topk_ids_rk, out.topk_logprobs_rk)
        scores = out.scores if scored else None
        pending.append(_Pending(arrays, list(enumerate(chosen)), scores, scored, t))
        self._refresh_rows()
        return True

    def _prefill_key(self, ji: int) -> tuple[Any, ...]:
        """Jobs with equal keys share one prefill row in an admission.

        An RL group arrives as separate requests with one prompt (the cookbook samples each
        rollout of a group with its own ``sample`` call), so the same prompt on the same
        adapter is prefilled once and its KV rows copied to every sample, as for
        ``num_samples``. A job that still owes prompt scores keeps its own row: scores and
        their inputs (targets, alt draws) are laid out per prefill row.
        """
        job = self.jobs[ji]
        if job.owes_scores:
            return ("job", ji)
        return ("prompt", job.slot, job.prompt.tobytes())

    def _prompts(self, order: list[int], n_p: int, t: int, c: int) -> tuple[np.ndarray, ...]:
        """Left-padded ``[P, T]`` tokens, positions, mask and ``[P]`` adapters: each prompt
        after its first ``c`` tokens (those come from the prefix cache)."""
        tokens, positions, mask = (np.zeros((n_p, t), np.int32) for _ in range(3))
        adapters = np.zeros(n_p, np.int32)
        for p, ji in enumerate(order):
            rest = self.jobs[ji].prompt[c:]
            tokens[p, t - len(rest) :] = rest
            mask[p, t - len(rest) :] = 1
            positions[p, t - len(rest) :] = np.arange(c, c + len(rest))
            adapters[p] = self.jobs[ji].slot
        return tokens, positions, mask, adapters

    def _context(self, order: list[int], n_p: int, take: _Take) -> np.ndarray:
        """``[P, C]`` pool slots of each prefilled prompt's reused prefix (-1: padding row)."""
        assert self.prefix_cache is not None
        slots = np.full((n_p, take.c), -1, np.int32)
        for p, ji in enumerate(order):
            match = take.matches[ji]
            assert match is not None
            assert match.context == take.c
            slots[p] = self.prefix_cache.context_slots(match)
        return slots

    def _scoring(
        self, order: list[int], n_p: int, t: int
    ) -> tuple[
        programs.Scoring, np.ndarray | None, RowSamplingParams | None, list[tuple[int, Job]]
    ]:
        """Bucketed prompt-score sizes for the jobs of ``order`` not scored yet, their inputs,
        and those jobs (the caller marks them sent once it admits them)."""
        todo = [(p, self.jobs[ji]) for p, ji in enumerate(order) if self.jobs[ji].owes_scores]
        sizes = [job.scoring for _, job in todo]
        topk, target_k, alt_k = (max((getattr(z, f) for z in sizes), default=0) for f in ("topk", "target_k", "alt_k"))  # fmt: skip
        scoring = programs.Scoring(
            logprobs=any(z.logprobs for z in sizes),
            topk=min(pow2(topk), self.engine.vocab_size) if topk else 0,
            target_k=pow2(target_k) if target_k else 0,  # padded with -1 ids
            alt_k=pow2(alt_k) if alt_k else 0,  # extra draws are dropped
        )
        targets = alt = None
        if scoring.target_k:
            targets = np.full((n_p, t - 1, scoring.target_k), -1, np.int32)
            for p, job in todo:
                if job.targets is not None:
                    n, k = job.targets.shape
                    targets[p, t - 1 - n :, :k] = job.targets
        if scoring.alt_k:
            alt_rows = [_GREEDY] * n_p
            for p, job in todo:
                alt_rows[p] = job.alt_row or _GREEDY
            alt = RowSamplingParams.stack(alt_rows)
        return scoring, targets, alt, todo

    def _refresh_rows(self) -> None:
        """Device copies of the decode rows' sampling values, adapters and prompt lengths."""
        rows = [r.sampling if r is not None else _GREEDY for r in self.owner]
        self.params = jax.tree.map(jnp.asarray, RowSamplingParams.stack(rows))
        slots = [self.jobs[r.job].slot if r is not None else 0 for r in self.owner]
        self.adapters = jnp.asarray(slots, jnp.int32)
        self.prompt_len = np.array(
            [len(self.jobs[r.job].prompt) if r is not None else 0 for r in self.owner], np.int32
        )

    # ----------------------------------------------------------------- decoding
    def _decode(self, live: list[int], pending: deque[_Pending]) -> None:
        """One dispatch of :meth:`_steps` decode steps for every row; the live ones generate
        their tokens ``sent`` onwards."""
        n = self._steps(live)
        positions, steps = np.zeros(self.batch, np.int32), np.zeros(self.batch, np.int32)
        for b in live:
            positions[b] = self.prompt_len[b] + self.sent[b] - 1
            steps[b] = self.sent[b]
        fn, static = self._decode_program()
        args = self._decode_args(
            self.tokens, positions, self.adapters, self.params, steps, self.cache, np.int32(n)
        )
        out = PROGRAMS.call(fn, static, **args)
        self.cache, self.tokens = out.cache, out.last_b
        self.index += n
        self.decode_steps += n
        self.decode_dispatches += 1
        arrays = (out.tokens_nb, out.logprobs_nb, out.topk_ids_nbk, out.topk_logprobs_nbk)
        pending.append(_Pending(arrays, [(b, self.owner[b]) for b in live], steps=n))  # type: ignore[misc]
        for b in live:
            self.sent[b] += n

    def _steps(self, live: list[int]) -> int:
        """Decode steps for the next dispatch: up to ``chunk``; as many as fit
        :data:`DISPATCH_SECONDS` at the measured step time (one until a step was measured);
        and no more than the live row nearest its ``max_tokens`` still needs. So a row that
        ends by length ends with a dispatch: its request is handed out, a waiting sample takes
        its row, or the batch shrinks, at the step they would with single steps; and no step
        writes past the cache slots the rows hold."""
        n = min(self.chunk, *(self.owner[b].state.max_tokens - self.sent[b] for b in live))  # type: ignore[union-attr]
        if self.step_seconds is None:
            return 1
        return max(1, min(n, int(DISPATCH_SECONDS / max(self.step_seconds, 1e-6))))

    def _decode_program(self) -> tuple[Any, dict[str, Any]]:
        return programs.decode_chunk, {
            "graphdef": self.graphdef, "chunk": self.chunk, "k": self.sample_topk
        }  # fmt: skip

    def _decode_args(self, *values: Any) -> dict[str, Any]:
        """The decode program's arguments by name: tokens, positions, adapters, sampling
        values, steps, cache and step count, then the model's state."""
        names = ("last_tokens_b", "positions_b", "adapters_b", "params", "step", "cache", "n")
        return {"lora": self.lora, "rest": self.rest, **dict(zip(names, values, strict=True))}

    # ----------------------------------------------------------------- compiling ahead
    def _ready(self, fn: Any, static: dict[str, Any], args: dict[str, Any]) -> bool:
        """Whether ``fn`` is compiled for ``args``; if not, and compiling ahead, starts its
        compile and returns False (the caller does something else meanwhile)."""
        if not self.compile_ahead or PROGRAMS.ready(fn, static, **args):
            return True
        self.compile_waits += 1
        return False

    def _resize_ready(self, batch: int) -> bool:
        """Whether the resize to ``batch`` rows and the decode step at that size are compiled
        (see :meth:`_ready`): a run resizes only then, and meanwhile goes on decoding at its
        current size. The decode step's arguments are this batch's, resized (a resized array
        keeps its sharding)."""

        def resized(x: Any, axis: int = 0) -> Any:
            return spec_like(x, (*x.shape[:axis], batch, *x.shape[axis + 1 :]))

        rows = np.zeros(batch, np.int32)
        resize = {"cache": self.cache, "tokens_b": self.tokens, "src_b": rows}
        old = self.cache
        cache = KVCache(
            resized(old.k_lbskh, 1), resized(old.v_lbskh, 1), resized(old.mask_bs), old.index
        )
        params = jax.tree.map(resized, self.params)
        fn, static = self._decode_program()
        decode = self._decode_args(
            resized(self.tokens), rows, resized(self.adapters), params, rows, cache, np.int32(1)
        )
        # Both asked (not short-circuited), so both compile meanwhile.
        return self._ready(programs.resize_rows, {}, resize) & self._ready(fn, static, decode)

    def _collect(self, item: _Pending) -> None:
        """Fetch one dispatch's outputs and feed them to the rows it served, step by step."""
        got = jax.device_get(item.arrays)
        self._time_steps(item.steps)
        if not item.steps:  # an admission: one step, no step axis
            got = tuple(None if x is None else x[None] for x in got)
        tokens, logprobs = got[0].tolist(), got[1].tolist()
        ids, lps = (got[2].tolist(), got[3].tolist()) if got[2] is not None else ([], [])
        ended: list[Row] = []
        topk = [self.jobs[row.job].sample_topk for _, row in item.rows]  # per row, not per step
        for j in range(max(1, item.steps)):
            for (i, row), k in zip(item.rows, topk, strict=True):
                if row.state.done:  # stopped on an earlier token; this one was speculative
                    continue
                row.logprobs.append(logprobs[j][i])
                if k:
                    row.topk.append(list(zip(ids[j][i][:k], lps[j][i][:k], strict=True)))
                if row.state.push(tokens[j][i]):
                    ended.append(row)
        if item.scores is not None:
            self._store_scores(item)
        if ended and self.prefix_cache is not None:
            self._keep_ended(ended)
        if ended and self.on_rows_done is not None:
            self.on_rows_done(ended)

    def _time_steps(self, steps: int) -> None:
        """Update :attr:`step_seconds` from a decode dispatch's fetch: with one dispatch in
        flight, the time since the previous fetch is about what the device (or, if it is
        slower, the host) took for the ``steps`` fetched. An average with the last estimate
        smooths one slow fetch (a compile in place, a busy host)."""
        now = time.perf_counter()
        if steps and self._fetched is not None:
            seconds = (now - self._fetched) / steps
            last = self.step_seconds
            self.step_seconds = seconds if last is None else (last + seconds) / 2
        self._fetched = now

    def _keep_ended(self, ended: list[Row]) -> None:
        """Keep ended rows' prompt and every token they fed back (all but the last), while
        the rows are still theirs."""
        owned = {id(row): b for b, row in enumerate(self.owner) if row is not None}
        sequences = []
        for row in ended:
            if id(row) not in owned:
                continue  # refilled or dropped before its last token came back
            job = self.jobs[row.job]
            tokens = np.concatenate([job.prompt, np.asarray(row.state.tokens[:-1], np.int32)])
            sequences.append((job, tokens, owned[id(row)]))
        self._keep(sequences)

    def _keep(self, sequences: list[tuple[Job, np.ndarray, int]]) -> None:
        """Put each ``(job, tokens, row)``'s keys/values in the prefix cache."""
        assert self.prefix_cache is not None
        keyed = [(self._prefix_key(job.slot), tokens, b) for job, tokens, b in sequences]
        self.prefix_cache.save(keyed, self.cache, self._empty_pool)

    def _settle(self, rows: list[int], pending: deque[_Pending]) -> None:
        """Fetch what is in flight before ``rows`` are refilled or dropped, if one of them
        ended by ``max_tokens`` with its last token still in flight: the prefix cache keeps a
        row when that token comes back (it names the sequence), while the row is still its."""
        if self.prefix_cache is None:
            return
        if any(row is not None and not row.state.done for row in map(self.owner.__getitem__, rows)):
            while pending:
                self._collect(pending.popleft())

    def _empty_pool(self, tokens: int) -> Any:
        return programs.empty_cache(self.graphdef, self.lora, self.rest, batch=1, cache_len=tokens)

    def _store_scores(self, item: _Pending) -> None:
        """Each scored job's columns of the prompt scores, as ``[len(prompt)-1, ...]`` arrays."""
        assert item.scores is not None
        got = jax.device_get(item.scores)
        for p, job in item.scored:
            cols = slice(item.t - len(job.prompt), item.t - 1)
            s, out = job.scoring, {}
            if s.logprobs:
                out["logprobs"] = got.logprobs_pt[p, cols]
            if s.topk:
                out["topk_ids"] = got.topk_ids_ptk[p, cols, : s.topk]
                out["topk_logprobs"] = got.topk_logprobs_ptk[p, cols, : s.topk]
            if s.target_k:
                out["target"] = got.target_ptk[p, cols, : s.target_k]
            if s.alt_k:
                out["alt_ids"] = got.alt_ids_ptk[p, cols, : s.alt_k]
                out["alt_logprobs"] = got.alt_logprobs_ptk[p, cols, : s.alt_k]
            job.scores = {k: np.asarray(v) for k, v in out.items()}
