"""Batched KV-cache generation over the trainer's own model and LoRA slots.

:class:`Sampler` turns a list of :class:`SampleRequestArrays` into :class:`SampleResult` s with
the compiled programs of :mod:`tx_engine.step`. It reads the engine's ``graphdef`` /
``lora`` / ``rest`` at every call, so an adapter sampled right after ``optim_step`` uses the new
weights, and at temperature 1 the returned logprobs are the trainer's forward logprobs.

How a call is run:

1. Each request is validated (token ids, adapter slot, sampling values, prompt-score options,
   fit) and expanded into ``num_samples`` decode rows sharing one seed (distinct sample
   indices → distinct draws).
2. Rows are grouped into *runs* by the cache length ``S`` their request needs (so one long
   request does not shrink everyone's batch); a run has ``B`` decode rows with
   ``B × S <= max_cache_tokens`` and ``B <= max_batch``.
3. Each run is **continuously batched** (:mod:`tx_engine.sampling.continuous`): waiting
   samples are prefilled into rows as soon as rows finish, so a short row never waits for the
   longest one. A prompt is prefilled once per admission and its KV rows copied to every
   sample: the samples of one request, and those of other requests with the same prompt and
   adapter (an RL group sent as one request per rollout). A request's result is complete as
   soon as its last row ends, and ``sample(..., on_ready=...)`` hands it out then, not when
   the whole call is done. ``sample(..., interruption=...)`` lets other work on the engine
   (training steps) run between two decode steps of a long call, and lets requests that
   arrive meanwhile :meth:`Sampler.join` the running batch: they take rows as rows free up,
   and the batch grows (up to ``max_batch`` and the cache budget) when none are free. With
   ``prefix_cache_tokens``, prompts' and ended rows' keys/values are kept, and a prompt that
   extends a kept sequence (a conversation's next turn, a shared system prompt) prefills only
   its new tokens (:mod:`tx_engine.sampling.prefix_cache`). One dispatch runs up to
   ``decode_chunk`` decode steps on the device; stops are checked, and rows refilled, between
   dispatches.
4. Shapes are bucketed so warm-up covers everything: ``B``, admission rows and top-k sizes to
   powers of two, prompt length to a power of two ≥ ``min_prompt_bucket``, ``S`` to the power
   of two ≥ ``T + max_new - 1``. max_tokens, temperature, top-k, top-p, seeds, positions and
   per-row steps, and the steps per dispatch, are array values: no recompilation.

A row's tokens depend only on its request (seed, sample index, prompt, values): not on the
batch it shares, the row it lands on or the cache slots it occupies.

Prompt scores (each computed once per request, at its first admission): ``prompt_logprobs``,
``topk_prompt_logprobs`` (both limited to the last ``prompt_logprobs_last_n`` positions when
set), ``target_prompt_logprobs`` (logprobs of given ids per position) and
``prompt_alt_tokens_k`` (independent draws per position with the request's sampling values).
Per sampled token: ``topk_sample_logprobs``. Prompt and target logprobs are the model's
(temperature 1, the trainer's forward logprobs); sampled tokens, their top-k and the alt draws
are scored under the request's tempered distribution (see :mod:`tx_engine.sampling`).

Limits: a request needs ``len(prompt) + max_tokens <= min(max_cache_tokens, context)`` (context
= ``max_position_embeddings``), otherwise :class:`InputError`; ``max_tokens=None`` means "up to
that limit".
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tx_engine import step as programs
from tx_engine.engine import TrainingEngine
from tx_engine.errors import AdapterError, InputError
from tx_engine.sampling import SamplingRow, StopCriteria
from tx_engine.sampling.continuous import (
    DEFAULT_DECODE_CHUNK,
    ContinuousRun,
    Interruption,
    Job,
    Row,
    pow2,
)
from tx_engine.sampling.params import ALT_DRAWS_SAMPLE_INDEX
from tx_engine.sampling.prefix_cache import PrefixCache
from tx_engine.sampling.stopping import DecodeFn, StopReason

__all__ = [
    "Interruption",
    "ResultsReady",
    "SampleRequestArrays",
    "SampleResult",
    "SampledSequence",
    "Sampler",
]

StopParam = str | Sequence[str] | Sequence[int] | None
TopK = list[tuple[int, float]]
ResultsReady = Callable[[list[tuple[int, "SampleResult"]]], None]


@dataclass(frozen=True)
class SampleRequestArrays:
    """One sample request: the prompt (int token ids), Tinker ``SamplingParams`` fields and the
    ``asample`` scoring options.

    ``adapter`` None or 0 samples the base model. ``stop`` follows the wire semantics (None →
    EOS, ``[]`` → never stop). ``max_tokens`` None → up to the cache/context limit.
    ``target_prompt_logprobs``: int ``[len(prompt)-1, K]`` token ids to score at each prompt
    position (row ``i`` scores position ``i+1``), ``-1`` = not requested.
    ``prompt_logprobs_last_n``: score only the last N prompt positions (prompt and top-k prompt
    logprobs; earlier entries are None).
    """

    prompt_tokens: np.ndarray
    num_samples: int = 1
    max_tokens: int | None = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    stop: StopParam = None
    adapter: int | None = None
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    target_prompt_logprobs: np.ndarray | None = None
    prompt_alt_tokens_k: int = 0
    prompt_logprobs_last_n: int | None = None


@dataclass(frozen=True)
class SampledSequence:
    """Generated ``tokens`` (int32, stop token included) and their ``logprobs`` (float32);
    ``topk_logprobs`` (if asked): per token, the k best ``(id, logprob)``, best first, under the
    same distribution as ``logprobs``."""

    tokens: np.ndarray
    logprobs: np.ndarray
    stop_reason: StopReason
    topk_logprobs: list[TopK] | None = None


@dataclass(frozen=True)
class SampleResult:
    """Samples of one request, plus prompt scores when asked (lists: index 0 is always None).

    ``target_prompt_logprobs``: float32 ``[len(prompt)-1, K]``, 0.0 where the id was -1.
    ``prompt_alt_tokens`` / ``prompt_alt_logprobs``: int32 / float32 ``[len(prompt)-1, k]``,
    ``k`` independent draws per position (row ``i`` → position ``i+1``) and their logprobs.
    """

    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[TopK | None] | None = None
    target_prompt_logprobs: np.ndarray | None = None
    prompt_alt_tokens: np.ndarray | None = None
    prompt_alt_logprobs: np.ndarray | None = None


class _Call:
    """One :meth:`Sampler.sample` call's requests, rows and results (joins extend them)."""

    def __init__(self, on_ready: ResultsReady | None) -> None:
        self.on_ready = on_ready
        self.requests: list[SampleRequestArrays] = []
        self.jobs: list[Job] = []
        self.rows_of: list[list[Row]] = []
        self.rows_left: list[int] = []
        self.results: list[SampleResult | None] = []
        self.runs: dict[int, list[Row]] = {}  # rows not run yet, by cache length
        self.current: ContinuousRun | None = None

    def rows_done(self, ended: list[Row]) -> None:
        """Build each request whose last row ended, and hand it out."""
        ready = []
        for row in ended:
            j = row.job
            self.rows_left[j] -= 1
            if self.rows_left[j] == 0:
                self.results[j] = result = _result(self.jobs[j], self.requests[j], self.rows_of[j])
                ready.append((j, result))
        if ready and self.on_ready is not None:
            self.on_ready(ready)


class Sampler:
    """Generation for a :class:`TrainingEngine` (see the module docstring).

    ``max_cache_tokens``: KV-cache budget in token slots (rows × cache length) of one run;
    this bounds sampler memory (a run that resizes holds its old and new cache for a moment:
    up to 1.5× the budget). ``decode_fn``: token ids → text, needed for stop strings.
    ``eos_token_ids``: default stop set; None reads ``config.json`` and
    ``generation_config.json`` of the engine's model directory. ``decode_steps``,
    ``cache_shifts``, ``prefilled_prompts``, ``interruptions`` and ``resizes`` count the decode
    steps, cache shifts, prompts prefilled, interruptions run and batch resizes so far (all
    calls). ``prefix_cache_tokens``: token slots of the prefix cache
    (:mod:`tx_engine.sampling.prefix_cache`; 0 = off), memory on top of ``max_cache_tokens``:
    a prompt that extends an earlier prompt or sample's sequence (the next turn of a
    conversation, a shared system prompt) prefills only what is new. Its counters are on
    :attr:`prefix_cache`. ``compile_ahead``: a new admission shape or batch size that live rows
    would wait for compiles on a background thread while they keep decoding
    (:mod:`tx_engine.sampling.continuous`); ``compile_waits`` counts the steps something waited.
    ``decode_chunk``: the most decode steps one dispatch runs before the host checks stops and
    admits waiting samples ("Decode chunks" in :mod:`tx_engine.sampling.continuous`);
    ``decode_dispatches`` counts the dispatches; ``step_seconds`` is a decode step's time as the
    last run measured it (several steps per dispatch only while steps are short).
    ``max_sequence_tokens``: the longest prompt + generation a request may ask for (a server's
    advertised context length); the limit is the smallest of it, ``max_cache_tokens`` and the
    model's context (``max_position_embeddings``).
    """

    def __init__(
        self,
        engine: TrainingEngine,
        *,
        max_cache_tokens: int = 65536,
        max_batch: int = 64,
        min_prompt_bucket: int = 16,
        decode_fn: DecodeFn | None = None,
        eos_token_ids: Sequence[int] | None = None,
        prefix_cache_tokens: int = 0,
        compile_ahead: bool = True,
        decode_chunk: int = DEFAULT_DECODE_CHUNK,
        max_sequence_tokens: int | None = None,
    ) -> None:
        for name, value, least in (
            ("max_cache_tokens", max_cache_tokens, 2),
            ("max_batch", max_batch, 2),
            ("min_prompt_bucket", min_prompt_bucket, 2),
            ("decode_chunk", decode_chunk, 1),
            ("max_sequence_tokens", 2 if max_sequence_tokens is None else max_sequence_tokens, 2),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise InputError(f"{name} must be an int >= {least}, got {value!r}")
        if pow2(max_batch) != max_batch:
            raise InputError(f"max_batch must be a power of two, got {max_batch}")
        if isinstance(prefix_cache_tokens, bool) or not isinstance(prefix_cache_tokens, int) or prefix_cache_tokens < 0:  # fmt: skip
            raise InputError(
                f"prefix_cache_tokens must be an int >= 0, got {prefix_cache_tokens!r}"
            )
        self.prefix_cache = (
            PrefixCache(prefix_cache_tokens, min_prompt_bucket) if prefix_cache_tokens else None
        )
        self.engine = engine
        self.max_batch = max_batch
        self.max_cache_tokens = max_cache_tokens
        self.min_prompt_bucket = min_prompt_bucket
        self.decode_fn = decode_fn
        self.compile_ahead = compile_ahead
        self.decode_chunk = decode_chunk
        self.step_seconds: float | None = None  # a decode step's time, as the last run measured
        self.decode_steps = self.cache_shifts = self.prefilled_prompts = self.interruptions = 0
        self.resizes = self.compile_waits = self.decode_dispatches = 0
        self._call: _Call | None = None  # the sample() call in progress
        hf = engine.model_config.hf_config
        context = int(hf.get("max_position_embeddings") or max_cache_tokens)
        self.max_sequence_tokens = min(context, max_cache_tokens, max_sequence_tokens or context)
        self.eos_token_ids = (
            tuple(int(t) for t in eos_token_ids)
            if eos_token_ids is not None
            else _model_eos_ids(hf, engine.model_dir)
        )

    # ----------------------------------------------------------------- public
    def sample(
        self,
        requests: Sequence[SampleRequestArrays],
        on_ready: ResultsReady | None = None,
        interruption: Interruption | None = None,
    ) -> list[SampleResult]:
        """Generate every request's samples; results are in request order.

        ``on_ready``, if given, receives ``(request index, result)`` pairs as requests finish
        (every pair once, several at a time when they end together), so a server can answer a
        short request while longer ones of the same call still decode. Everything is
        validated before anything runs, so a bad request raises before any result is handed
        out. ``interruption``, if given, is asked before each decode dispatch (of up to
        ``decode_chunk`` steps) whether other work should run now
        (:mod:`tx_engine.sampling.continuous`); that work must leave the adapter slots of
        ``requests`` alone, and may add requests with :meth:`join`.
        """
        call = _Call(on_ready)
        for request in requests:  # all validated before anything runs
            self._add(call, request)
        previous, self._call = self._call, call
        try:
            while call.runs:
                s = min(call.runs)  # shortest cache first, as joins may add runs
                rows = call.runs.pop(s)
                most = min(self.max_batch, _floor_pow2(self.max_cache_tokens // s))
                run = ContinuousRun(
                    self.engine,
                    call.jobs,
                    rows,
                    batch=min(most, pow2(len(rows))),
                    cache_len=s,
                    on_rows_done=call.rows_done,
                    interruption=interruption,
                    max_batch=most,
                    prefix_cache=self.prefix_cache,
                    compile_ahead=self.compile_ahead,
                    decode_chunk=self.decode_chunk,
                    step_seconds=self.step_seconds,
                )
                call.current = run
                run.run()
                call.current = None
                self.decode_steps += run.decode_steps
                self.cache_shifts += run.cache_shifts
                self.prefilled_prompts += run.prefilled_prompts
                self.interruptions += run.interruptions
                self.resizes += run.resizes
                self.compile_waits += run.compile_waits
                self.decode_dispatches += run.decode_dispatches
                self.step_seconds = run.step_seconds
        finally:
            self._call = previous
        finished = [r for r in call.results if r is not None]
        if len(finished) != len(call.jobs):
            raise RuntimeError("sampler: a run ended with unfinished rows")
        return finished

    def join(self, request: SampleRequestArrays) -> int:
        """Add ``request`` to the :meth:`sample` call in progress; its index in that call.

        Only valid from that call's ``interruption`` (between decode steps). The request is
        validated here (a bad one raises and changes nothing). Its rows join the running batch
        when they fit it (cache length, top-k size, adapter rank bucket), else a later run of
        the same call; they take free rows, or rows the batch grows by (:attr:`free_rows`),
        else rows as they free up. Its result goes to the call's ``on_ready`` and is appended
        to the call's return value.
        """
        if self._call is None or self._call.current is None:
            raise RuntimeError("Sampler.join is only valid between the decode steps of a call")
        return self._add(self._call, request)

    @property
    def free_rows(self) -> int:
        """Decode rows of the running batch, free or that it may still grow by, that a
        joining sample would take at once."""
        call = self._call
        return 0 if call is None or call.current is None else call.current.free_rows()

    def _add(self, call: _Call, req: SampleRequestArrays) -> int:
        """Validate ``req`` and queue its rows in ``call``; its index in the call."""
        i = len(call.jobs)
        job = self._prepare(i, req)
        criteria = self._criteria(i, req)
        rows = [
            Row(i, sampling, criteria.new_state(job.max_new))
            for sampling in self._sampling_rows(i, req)
        ]
        if req.prompt_alt_tokens_k:
            last = rows[-1].sampling
            job.alt_row = SamplingRow(
                last.temperature, last.top_k, last.top_p, last.seed, ALT_DRAWS_SAMPLE_INDEX
            )
        call.jobs.append(job)
        call.requests.append(req)
        call.rows_of.append(rows)
        call.rows_left.append(len(rows))
        call.results.append(None)
        s = self.bucket_shape(len(job.prompt), job.max_new)[1]
        if call.current is not None and call.current.accepts(job, s):
            call.current.extend(rows)
        else:
            call.runs.setdefault(s, []).extend(rows)
        return i

    def bucket_shape(self, longest: int, max_new: int) -> tuple[int, int]:
        """``(T, S)``: bucketed prompt length and cache length for a prompt of ``longest``
        tokens generating up to ``max_new`` (both within the limit)."""
        t = pow2(longest, self.min_prompt_bucket)
        if t + max_new - 1 > self.max_sequence_tokens:
            t = max(longest, 2)  # bucketing would overflow the limit; the exact length fits
        return t, min(pow2(t + max_new - 1), self.max_sequence_tokens)

    # ----------------------------------------------------------------- validation
    def _prepare(self, i: int, r: SampleRequestArrays) -> Job:
        where = f"requests[{i}]"
        prompt = np.asarray(r.prompt_tokens)
        if prompt.ndim != 1 or prompt.size == 0 or not np.issubdtype(prompt.dtype, np.integer):
            raise InputError(f"{where}.prompt_tokens must be a non-empty 1-D int array")
        vocab = self.engine.vocab_size
        if prompt.min() < 0 or prompt.max() >= vocab:
            raise InputError(f"{where}.prompt_tokens has ids outside [0, {vocab})")
        for name in ("num_samples", "topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k"):  # fmt: skip
            value = getattr(r, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputError(f"{where}.{name} must be an int >= 0, got {value!r}")
        if r.num_samples < 1:
            raise InputError(f"{where}.num_samples must be >= 1, got {r.num_samples}")
        for name in ("topk_prompt_logprobs", "topk_sample_logprobs"):
            if getattr(r, name) > vocab:
                raise InputError(f"{where}.{name} must be <= vocab size {vocab}")
        last_n = r.prompt_logprobs_last_n
        if last_n is not None and (isinstance(last_n, bool) or not isinstance(last_n, int) or last_n < 1):  # fmt: skip
            raise InputError(f"{where}.prompt_logprobs_last_n must be an int >= 1, got {last_n!r}")
        targets = _targets(where, r.target_prompt_logprobs, len(prompt), vocab)
        slot = 0 if r.adapter is None else r.adapter
        if slot != 0 and slot not in self.engine.adapters:
            raise AdapterError(f"{where}.adapter: slot {slot} is not an allocated adapter")
        max_new = self._max_new(where, r.max_tokens, len(prompt))
        scoring = programs.Scoring(
            logprobs=r.prompt_logprobs,
            topk=r.topk_prompt_logprobs,
            target_k=0 if targets is None else max(1, targets.shape[1]),
            alt_k=r.prompt_alt_tokens_k,
        )
        return Job(
            prompt=prompt.astype(np.int32),
            slot=int(slot),
            max_new=max_new,
            prompt_t=self.bucket_shape(len(prompt), max_new)[0],
            scoring=scoring,
            targets=targets,
            sample_topk=r.topk_sample_logprobs,
        )

    def _max_new(self, where: str, mt: int | None, prompt_len: int) -> int:
        if mt is not None and (isinstance(mt, bool) or not isinstance(mt, int) or mt < 1):
            raise InputError(f"{where}.max_tokens must be an int >= 1 or None, got {mt!r}")
        room = self.max_sequence_tokens - prompt_len
        max_new = room if mt is None else mt
        if max_new < 1 or max_new > room:
            raise InputError(
                f"{where}: prompt ({prompt_len} tokens) + max_tokens ({mt}) exceeds "
                f"the sampler limit of {self.max_sequence_tokens} tokens "
                "(min of max_sequence_tokens, max_cache_tokens and the model's context)"
            )
        return int(max_new)

    def _criteria(self, i: int, r: SampleRequestArrays) -> StopCriteria:
        try:
            return StopCriteria.from_params(r.stop, self.eos_token_ids, self.decode_fn)
        except ValueError as e:
            raise InputError(f"requests[{i}].{e}") from None

    def _sampling_rows(self, i: int, r: SampleRequestArrays) -> list[SamplingRow]:
        try:
            return SamplingRow.for_request(
                num_samples=r.num_samples,
                temperature=float(r.temperature),
                top_k=r.top_k,
                top_p=float(r.top_p),
                seed=r.seed,
            )
        except ValueError as e:
            raise InputError(f"requests[{i}].{e}") from None


def _floor_pow2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _targets(where: str, value: Any, prompt_len: int, vocab: int) -> np.ndarray | None:
    """``target_prompt_logprobs`` checked: int ``[len(prompt)-1, K]`` ids in ``[-1, vocab)``."""
    if value is None:
        return None
    arr = np.asarray(value)
    name = f"{where}.target_prompt_logprobs"
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{name} must be a 2-D int array, got {arr.dtype} {arr.shape}")
    if arr.shape[0] != prompt_len - 1:
        raise InputError(
            f"{name} must have len(prompt)-1 = {prompt_len - 1} rows, got {arr.shape[0]}"
        )
    if arr.size and (arr.min() < -1 or arr.max() >= vocab):
        raise InputError(f"{name} has ids outside [-1, {vocab})")
    return arr.astype(np.int32)


def _result(job: Job, req: SampleRequestArrays, sample_rows: list[Row]) -> SampleResult:
    """A finished request's result: its rows' sequences (sample order) and prompt scores."""
    sequences = [
        SampledSequence(
            np.asarray(row.state.tokens, np.int32),
            np.asarray(row.logprobs, np.float32),
            _stop_reason(row),
            row.topk if job.sample_topk else None,
        )
        for row in sample_rows
    ]
    got = job.scores or {}
    n = len(job.prompt)
    first = 1 if req.prompt_logprobs_last_n is None else max(1, n - req.prompt_logprobs_last_n)
    lp: list[float | None] | None = None
    if "logprobs" in got:
        lp = [None] * first + [float(x) for x in got["logprobs"][first - 1 :]]
    topk: list[TopK | None] | None = None
    if "topk_ids" in got:
        rows = zip(got["topk_ids"].tolist(), got["topk_logprobs"].tolist(), strict=True)
        topk = [None] * n
        for i, (ids, lps) in enumerate(rows, start=1):
            if i >= first:
                topk[i] = list(zip(ids, lps, strict=True))
    target = None
    if req.target_prompt_logprobs is not None:
        k = np.shape(req.target_prompt_logprobs)[1]
        target = got.get("target", np.zeros((n - 1, k), np.float32))[:, :k].astype(np.float32)
    return SampleResult(
        sequences, lp, topk, target,
        got["alt_ids"].astype(np.int32) if "alt_ids" in got else None,
        got["alt_logprobs"].astype(np.float32) if "alt_logprobs" in got else None,
    )  # fmt: skip


def _stop_reason(row: Row) -> StopReason:
    assert row.state.stop_reason is not None, "a row is finished only once it has a reason"
    return row.state.stop_reason


def _model_eos_ids(hf_config: Any, model_dir: Any) -> tuple[int, ...]:
    """EOS ids from ``config.json`` and ``generation_config.json`` (union, sorted)."""
    found: set[int] = set()
    sources = [hf_config.get("eos_token_id")]
    gen_path = model_dir / "generation_config.json"
    if gen_path.is_file():
        sources.append(json.loads(gen_path.read_text()).get("eos_token_id"))
    for value in sources:
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, list):
            found.update(int(v) for v in value)
    return tuple(sorted(found))
