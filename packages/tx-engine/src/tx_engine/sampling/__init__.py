"""Sampling: per-row token selection kernels (device) and stop criteria (host).

A decode step in `step.py` does, per batch row ``b`` generating its ``step_b``-th token::

    keys = decode_keys(params.key_data, step_b)           # uint32[B, 2]
    tokens_b, logprobs_b = sample_tokens(logits_bv, params, keys)

where ``params = RowSamplingParams.stack(rows, pad_to=bucket)`` is built on the host from
``SamplingRow.for_request(num_samples=..., temperature=..., top_k=..., top_p=..., seed=...)``.
All per-row values are array data, so new values never recompile. The host then feeds each
row's token to its `StopState` (from `StopCriteria.from_params(stop, eos_ids, decode_fn)`).

Returned logprobs are ``log_softmax(logits / T)`` at the chosen token, untruncated (T=1 for
greedy rows): at T=1 they equal the trainer's forward logprobs. See `kernels`.

`continuous` (imported by the sampler, not here: it uses the compiled programs of `step.py`,
which import this package) runs the continuously batched decode loop; `decode` is the decode
step's forward pass (the model's function for one token per row, writing the cache in place).
"""

from tx_engine.sampling.kernels import sample_tokens, token_logprobs, topk_logprobs
from tx_engine.sampling.params import (
    RowSamplingParams,
    SamplingRow,
    decode_keys,
    resolve_seed,
    row_key_data,
)
from tx_engine.sampling.stopping import StopCriteria, StopReason, StopState

__all__ = [
    "RowSamplingParams",
    "SamplingRow",
    "StopCriteria",
    "StopReason",
    "StopState",
    "decode_keys",
    "resolve_seed",
    "row_key_data",
    "sample_tokens",
    "token_logprobs",
    "topk_logprobs",
]
