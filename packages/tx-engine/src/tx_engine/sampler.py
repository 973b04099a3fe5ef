"""Batched KV-cache generation over the trainer's own model and LoRA slots.

:class:`Sampler` turns a list of :class:`SampleRequestArrays` into :class:`SampleResult` s with
the compiled programs of :mod:`tx_engine.step`. It reads the engine's ``graphdef`` /
``lora`` / ``rest`` at every call, so an adapter sampled right after ``optim_step`` uses the new
weights, and at temperature 1 the returned logprobs are the trainer's forward logprobs.

How a call is run:

1. Each request is validated (token ids, adapter slot, sampling values, fit) and expanded into
   ``num_samples`` decode rows sharing one seed (distinct sample indices → distinct draws).
2. Rows are packed, in order, into *waves* whose cache ``rows × S`` fits ``max_cache_tokens``
   and whose row count is at most ``max_batch``. Within a wave each request is prefilled once
   and its cache rows copied to its samples.
3. Shapes are bucketed so warm-up covers everything: prefill rows and decode rows to powers of
   two (≤ ``max_batch``), prompt length to a power of two ≥ ``min_prompt_bucket``, cache length
   ``S`` to the power of two ≥ ``T + max_new - 1``; top-k prompt logprobs' ``k`` to a power of
   two. max_tokens, temperature, top-k, top-p and seeds are array values: no recompilation.
4. Decode is pipelined one step ahead (step ``i+1`` is dispatched before step ``i``'s tokens are
   fetched for the stop checks), and the loop **exits early** as soon as every row of the wave
   has stopped or reached its ``max_tokens``. Finished rows are *not* refilled with waiting
   requests (no continuous batching yet): waiting rows run in the next wave.

Limits: a request needs ``len(prompt) + max_tokens <= min(max_cache_tokens, context)`` (context
= ``max_position_embeddings``), otherwise :class:`InputError`; ``max_tokens=None`` means "up to
that limit".
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tx_engine import step as programs
from tx_engine.batching import InputError
from tx_engine.engine import TrainingEngine
from tx_engine.errors import AdapterError
from tx_engine.sampling import RowSamplingParams, SamplingRow, StopCriteria, StopState
from tx_engine.sampling.stopping import DecodeFn, StopReason

__all__ = ["SampleRequestArrays", "SampleResult", "SampledSequence", "Sampler"]

StopParam = str | Sequence[str] | Sequence[int] | None


@dataclass(frozen=True)
class SampleRequestArrays:
    """One sample request: the prompt (int token ids) and Tinker ``SamplingParams`` fields.

    ``adapter`` None or 0 samples the base model. ``stop`` follows the wire semantics (None →
    EOS, ``[]`` → never stop). ``max_tokens`` None → up to the cache/context limit.
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


@dataclass(frozen=True)
class SampledSequence:
    """Generated ``tokens`` (int32, stop token included) and their ``logprobs`` (float32)."""

    tokens: np.ndarray
    logprobs: np.ndarray
    stop_reason: StopReason


@dataclass(frozen=True)
class SampleResult:
    """Samples of one request, plus prompt scores when asked (index 0 is always None)."""

    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None


@dataclass
class _Request:
    """A validated request and what its waves produced."""

    prompt: np.ndarray
    slot: int
    max_new: int
    spec: SampleRequestArrays
    prompt_lp: list[float | None] | None = None
    prompt_topk: list[list[tuple[int, float]] | None] | None = None


@dataclass
class _Row:
    """One decode row: a sample of a request."""

    req: int
    sampling: SamplingRow
    state: StopState
    logprobs: list[float] = field(default_factory=list)


def _pow2(n: int, floor: int = 1) -> int:
    return 1 << max(0, max(n, floor) - 1).bit_length()


class Sampler:
    """Generation for a :class:`TrainingEngine` (see the module docstring).

    ``max_cache_tokens``: KV-cache budget in token slots (rows × cache length) of one wave;
    this bounds sampler memory. ``decode_fn``: token ids → text, needed for stop strings.
    ``eos_token_ids``: default stop set; None reads ``config.json`` and
    ``generation_config.json`` of the engine's model directory.
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
    ) -> None:
        for name, value in (
            ("max_cache_tokens", max_cache_tokens),
            ("max_batch", max_batch),
            ("min_prompt_bucket", min_prompt_bucket),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise InputError(f"{name} must be an int >= 2, got {value!r}")
        if _pow2(max_batch) != max_batch:
            raise InputError(f"max_batch must be a power of two, got {max_batch}")
        self.engine = engine
        self.max_batch = max_batch
        self.max_cache_tokens = max_cache_tokens
        self.min_prompt_bucket = min_prompt_bucket
        self.decode_fn = decode_fn
        hf = engine.model_config.hf_config
        context = int(hf.get("max_position_embeddings") or max_cache_tokens)
        self.max_sequence_tokens = min(context, max_cache_tokens)
        self.eos_token_ids = (
            tuple(int(t) for t in eos_token_ids)
            if eos_token_ids is not None
            else _model_eos_ids(hf, engine.model_dir)
        )

    # ----------------------------------------------------------------- public
    def sample(self, requests: Sequence[SampleRequestArrays]) -> list[SampleResult]:
        """Generate every request's samples; results are in request order."""
        reqs = [self._prepare(i, r) for i, r in enumerate(requests)]
        rows: list[_Row] = []
        for i, req in enumerate(reqs):
            criteria = self._criteria(i, req.spec)
            for sampling in self._sampling_rows(i, req.spec):
                rows.append(_Row(i, sampling, criteria.new_state(req.max_new)))
        for wave in self._plan(reqs, rows):
            self._run_wave(reqs, wave)
        results = [SampleResult([], r.prompt_lp, r.prompt_topk) for r in reqs]
        for row in rows:
            assert row.state.stop_reason is not None
            seq = SampledSequence(
                np.asarray(row.state.tokens, np.int32),
                np.asarray(row.logprobs, np.float32),
                row.state.stop_reason,
            )
            results[row.req].sequences.append(seq)
        return results

    # ----------------------------------------------------------------- validation
    def _prepare(self, i: int, r: SampleRequestArrays) -> _Request:
        where = f"requests[{i}]"
        prompt = np.asarray(r.prompt_tokens)
        if prompt.ndim != 1 or prompt.size == 0 or not np.issubdtype(prompt.dtype, np.integer):
            raise InputError(f"{where}.prompt_tokens must be a non-empty 1-D int array")
        vocab = self.engine.vocab_size
        if prompt.min() < 0 or prompt.max() >= vocab:
            raise InputError(f"{where}.prompt_tokens has ids outside [0, {vocab})")
        for name in ("num_samples", "topk_prompt_logprobs"):
            value = getattr(r, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputError(f"{where}.{name} must be an int >= 0, got {value!r}")
        if r.num_samples < 1:
            raise InputError(f"{where}.num_samples must be >= 1, got {r.num_samples}")
        if r.topk_prompt_logprobs > vocab:
            raise InputError(f"{where}.topk_prompt_logprobs must be <= vocab size {vocab}")
        slot = 0 if r.adapter is None else r.adapter
        if slot != 0 and slot not in self.engine.adapters:
            raise AdapterError(f"{where}.adapter: slot {slot} is not an allocated adapter")
        mt = r.max_tokens
        if mt is not None and (isinstance(mt, bool) or not isinstance(mt, int) or mt < 1):
            raise InputError(f"{where}.max_tokens must be an int >= 1 or None, got {mt!r}")
        room = self.max_sequence_tokens - len(prompt)
        max_new = room if mt is None else mt
        if max_new < 1 or max_new > room:
            raise InputError(
                f"{where}: prompt ({len(prompt)} tokens) + max_tokens ({r.max_tokens}) exceeds "
                f"the sampler limit of {self.max_sequence_tokens} tokens "
                "(min of max_cache_tokens and the model's context)"
            )
        return _Request(prompt.astype(np.int32), int(slot), int(max_new), r)

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

    # ----------------------------------------------------------------- planning
    def _shape(self, reqs: list[_Request], rows: Sequence[_Row]) -> tuple[int, int]:
        """``(T, S)`` for a wave of ``rows`` (see `bucket_shape`)."""
        longest = max(len(reqs[r.req].prompt) for r in rows)
        return self.bucket_shape(longest, max(reqs[r.req].max_new for r in rows))

    def bucket_shape(self, longest: int, max_new: int) -> tuple[int, int]:
        """``(T, S)``: bucketed prompt length and cache length for the longest prompt and the
        largest ``max_tokens`` of a wave (both within the limit)."""
        t = _pow2(longest, self.min_prompt_bucket)
        if t + max_new - 1 > self.max_sequence_tokens:
            t = max(longest, 2)  # bucketing would overflow the limit; the exact length fits
        return t, min(_pow2(t + max_new - 1), self.max_sequence_tokens)

    def _plan(self, reqs: list[_Request], rows: list[_Row]) -> list[list[_Row]]:
        """Consecutive rows grouped so each wave's padded cache fits the token budget."""
        waves: list[list[_Row]] = [[]]
        longest = max_new = 0
        for row in rows:
            req = reqs[row.req]
            grown = (max(longest, len(req.prompt)), max(max_new, req.max_new))
            n = len(waves[-1]) + 1
            _, s = self.bucket_shape(*grown)
            if n > 1 and (n > self.max_batch or _pow2(n) * s > self.max_cache_tokens):
                waves.append([])
                grown = (len(req.prompt), req.max_new)
            waves[-1].append(row)
            longest, max_new = grown
        return waves

    # ----------------------------------------------------------------- execution
    def _run_wave(self, reqs: list[_Request], rows: list[_Row]) -> None:
        t, s = self._shape(reqs, rows)
        order = list(dict.fromkeys(r.req for r in rows))  # prefill rows, first-seen order
        p_rows, b_rows = _pow2(len(order)), _pow2(len(rows))
        tokens, mask, positions = (np.zeros((p_rows, t), np.int32) for _ in range(3))
        adapters_p = np.zeros(p_rows, np.int32)
        for p, ri in enumerate(order):
            prompt = reqs[ri].prompt
            tokens[p, t - len(prompt) :] = prompt
            mask[p, t - len(prompt) :] = 1
            positions[p, t - len(prompt) :] = np.arange(len(prompt))
            adapters_p[p] = reqs[ri].slot
        row_src = np.zeros(b_rows, np.int32)
        row_src[: len(rows)] = [order.index(r.req) for r in rows]
        prompt_len_b = np.array([len(reqs[ri].prompt) for ri in order], np.int32)[row_src]
        adapters_b = adapters_p[row_src]
        params = RowSamplingParams.stack([r.sampling for r in rows], pad_to=b_rows)
        todo = [ri for ri in order if reqs[ri].prompt_lp is None and reqs[ri].prompt_topk is None]
        want_lp = any(reqs[ri].spec.prompt_logprobs for ri in todo)
        top_k = max((reqs[ri].spec.topk_prompt_logprobs for ri in todo), default=0)
        top_k = min(_pow2(top_k), self.engine.vocab_size) if top_k else 0
        e = self.engine
        out = programs.prefill(
            e._graphdef, e._lora, e._rest, tokens, positions, mask, adapters_p, row_src,
            params, cache_len=s, prompt_logprobs=want_lp, prompt_topk=top_k,
        )  # fmt: skip
        if want_lp or top_k:
            self._store_prompt_scores(reqs, order, todo, t, out)
        self._decode(rows, out, prompt_len_b, adapters_b, params)

    def _decode(
        self,
        rows: list[_Row],
        out: programs.PrefillOut,
        prompt_len_b: np.ndarray,
        adapters_b: np.ndarray,
        params: RowSamplingParams,
    ) -> None:
        """Decode until every row is done, dispatching one step ahead of the stop checks."""
        e = self.engine
        steps = max(r.state.max_tokens for r in rows)
        cache = out.cache
        pending: tuple[Any, Any] = (out.tokens_b, out.logprobs_b)
        dev_params = jax.tree.map(jnp.asarray, params)
        dev_adapters = jnp.asarray(adapters_b)
        for step in range(steps):
            nxt = None
            if step + 1 < steps:
                positions = jnp.asarray(prompt_len_b + step, jnp.int32)
                tok, lp, cache = programs.decode_step(
                    e._graphdef, e._lora, e._rest, pending[0], positions, dev_adapters,
                    dev_params, jnp.asarray(step + 1, jnp.int32), cache,
                )  # fmt: skip
                nxt = (tok, lp)
            tokens_b, logprobs_b = jax.device_get(pending)
            for b, row in enumerate(rows):
                if not row.state.done:
                    row.logprobs.append(float(logprobs_b[b]))
                    row.state.push(int(tokens_b[b]))
            if nxt is None or all(r.state.done for r in rows):
                break
            pending = nxt
        for row in rows:  # only reachable undone if the wave's step count was cut
            row.state.end_for_length()

    @staticmethod
    def _store_prompt_scores(
        reqs: list[_Request],
        order: list[int],
        todo: list[int],
        t: int,
        out: programs.PrefillOut,
    ) -> None:
        lp_pt, ids_ptk, lps_ptk = jax.device_get(
            (out.prompt_logprobs_pt, out.topk_ids_ptk, out.topk_logprobs_ptk)
        )
        for ri in todo:
            req, p = reqs[ri], order.index(ri)
            cols = slice(t - len(req.prompt), t - 1)
            if req.spec.prompt_logprobs:
                req.prompt_lp = [None, *(float(x) for x in lp_pt[p, cols])]
            k = req.spec.topk_prompt_logprobs
            if k:
                ids, lps = ids_ptk[p, cols, :k], lps_ptk[p, cols, :k]
                req.prompt_topk = [
                    None,
                    *(
                        [(int(a), float(b)) for a, b in zip(i_row, l_row, strict=True)]
                        for i_row, l_row in zip(ids, lps, strict=True)
                    ),
                ]


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
