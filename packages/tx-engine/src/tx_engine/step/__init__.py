"""The compiled programs — training and sampling — the only ``jax.jit`` in tx-engine.

The package splits them by side (:mod:`.training`, :mod:`.sampling`, and :mod:`.graph` for what
both share) and re-exports every program here, so callers write ``step.forward_backward``.

The model lives here as three pieces so that each program is a pure function: ``graphdef``
(static structure, hashable, a static argument), ``lora`` (the :class:`LoRAParam` state, the
only thing differentiated and updated) and ``rest`` (base weights and LoRA scalings, read only).
A batch is the dict produced by :func:`tx_engine.batching.pack`; its shapes are bucketed there,
so a new batch size or length inside a bucket reuses the compiled program.

* :func:`forward` — per-datum loss outputs, no gradient.
* :func:`forward_backward` — the same outputs, and the gradient of the *summed* loss w.r.t.
  every adapter slot's factors, **added** into the gradient accumulator ``grads``. Rows of
  adapter ``s`` only touch slot ``s``'s gradient (the LoRA gather makes the other slots'
  cotangents zero), so one call serves many tenants and accumulation across calls and
  micro-batches is a plain sum. ``grads`` is donated: its buffer becomes the output. With
  ``rank`` (the engine passes its rank bucket) only those rank entries are differentiated and
  added, in place.
* :func:`apply_update` — AdamW (:mod:`tx_engine.optim`) on a subset of slots (the engine's
  live ones) at a rank bucket, for the entries in ``step_mask``, and a reset of those slots'
  accumulators; params, optimizer state and accumulator are donated. It runs two programs,
  ``adamw_slots`` (reads) and ``write_slots`` (in-place writes): see its docstring for why.

On a device mesh the training programs take the engine's
:class:`~tx_engine.sharding.TrainShardings` (static) and pin their outputs to it; on one device
that argument is None and the programs are unchanged.

The engine hands out graphdefs wrapped in :class:`StaticGraph` (hashed once per graphdef, not
per dispatch; :meth:`TrainingEngine.graphdef_for_slots` returns one); every program also takes a
bare ``GraphDef``. Likewise the model's state trees cross every jit boundary flat
(:mod:`.flat_state`): the training programs take and return ``nnx.State`` or, through their
``.flat`` form, the flat trees the engine holds.

Target log-probs are computed ``logits_chunk`` tokens at a time (static; see
:func:`_target_logprobs`), so ``[B, T, V]`` logits never exist at once. The loss name is static
(each loss is a different program); loss config values and optimizer
hyperparameters are traced arrays, so changing them never recompiles. :data:`TRACE_COUNTS`
counts traces per program — tests use it to prove the absence of recompilation.

Sampling (:func:`prefill`, :func:`decode_step`) uses the same three model pieces, so a
sampled token is scored by exactly the weights — base and LoRA slots — that :func:`forward`
and :func:`forward_backward` use. Layout (built by :mod:`tx_engine.sampler`): the prompts of
``P`` requests are **left**-padded to a bucketed length ``T``, so every prompt ends at column
``T-1`` and the cache's shared write index is ``T`` for all rows after prefill; decode step ``i`` writes slot ``T+i-1``. The cache has
``S`` slots (bucketed). ``row_src_b`` maps each of the ``B`` decode rows (request × sample) to its
prefill row: a request with ``num_samples = n`` is prefilled once and its cache rows copied ``n``
times. All per-row sampling values are arrays (:class:`RowSamplingParams`), so only ``P``,
``T``, ``B``, ``S`` and the two prompt-logprob flags select a program. Continuous batching
(:mod:`tx_engine.sampling.continuous`) adds :func:`admit` (prefill waiting prompts straight into
finished rows of a running cache, ending just before the shared write slot) and
:func:`shift_cache` (slide every row left when the write slot reaches the end) and
:func:`resize_rows` (more decode rows for samples that join a running batch), and
:func:`save_prefix` (keep rows' keys/values for a later prompt that extends them);
:func:`decode_step_topk` is the decode step that also returns per-token top-k logprobs, and
:func:`decode_chunk` runs up to ``chunk`` decode steps (either kind) in one dispatch.

Full fine-tuning (:func:`full_train_step`, used by ``tx train`` without ``--lora-rank``)
differentiates the same :func:`_loss` with respect to *all* weights and applies an optax
optimizer, so offline training and the server share one loss implementation.
"""

from tx_engine.step.graph import TRACE_COUNTS, Batch, State, StaticGraph, graph_of
from tx_engine.step.sampling import (
    NO_SCORING,
    AdmitOut,
    DecodeChunk,
    PrefillOut,
    PromptScores,
    Scoring,
    admit,
    decode_chunk,
    decode_step,
    decode_step_topk,
    empty_cache,
    prefill,
    resize_rows,
    save_prefix,
    shift_cache,
)
from tx_engine.step.training import (
    apply_update,
    forward,
    forward_backward,
    full_train_step,
    take_slot,
    zeros_like_state,
)

__all__ = [
    "NO_SCORING",
    "TRACE_COUNTS",
    "AdmitOut",
    "Batch",
    "DecodeChunk",
    "PrefillOut",
    "PromptScores",
    "Scoring",
    "State",
    "StaticGraph",
    "admit",
    "apply_update",
    "decode_chunk",
    "decode_step",
    "decode_step_topk",
    "empty_cache",
    "forward",
    "forward_backward",
    "full_train_step",
    "graph_of",
    "prefill",
    "resize_rows",
    "save_prefix",
    "shift_cache",
    "take_slot",
    "zeros_like_state",
]
