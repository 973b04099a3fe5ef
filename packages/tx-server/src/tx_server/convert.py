"""Wire types ↔ engine arrays: the one place where ``tx_types`` meets ``tx_engine``.

Why one module: the engine speaks numpy (:class:`~tx_engine.batching.DatumArrays`), the wire
speaks pydantic (:class:`tx_types.Datum`). Keeping the translation here means a wire change
touches one file and the engine never learns about JSON or protobuf. Only the worker imports
this module (it pulls in the engine, hence jax).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tx_engine.batching import DatumArrays, GroupOutput
from tx_engine.engine import AdamParams as EngineAdamParams
from tx_engine.errors import InputError
from tx_engine.sampler import SampleRequestArrays, SampleResult
from tx_types import (
    AdamParams,
    Datum,
    ForwardBackwardInput,
    ForwardBackwardOutput,
    PromptAltTokens,
    SampledSequence,
    SampleRequest,
    SampleResponse,
    TensorData,
)
from tx_types.proto._tensors import tensor_data_to_numpy

__all__ = [
    "CUSTOM_LOSS_MESSAGE",
    "adam_params",
    "datum_arrays",
    "forward_backward_output",
    "loss_config",
    "sample_request_arrays",
    "sample_response",
]


def datum_arrays(data: Sequence[Datum]) -> list[DatumArrays]:
    """Engine arrays for wire datums; InputError (a user error) names the offending datum."""
    out = []
    for i, datum in enumerate(data):
        try:
            tokens = np.asarray(datum.model_input.to_ints(), dtype=np.int64)
        except ValueError as exc:
            raise InputError(f"data[{i}].model_input: {exc}") from None
        inputs = {}
        for key, tensor in datum.loss_fn_inputs.items():
            try:
                inputs[key] = tensor_data_to_numpy(tensor)
            except ValueError as exc:
                raise InputError(f"data[{i}].loss_fn_inputs[{key!r}]: {exc}") from None
        out.append(DatumArrays(input_tokens=tokens, loss_fn_inputs=inputs))
    return out


def loss_config(fwd: ForwardBackwardInput) -> dict[str, float] | None:
    """Numeric loss config for the engine; string values belong to losses it does not run."""
    if fwd.loss_fn == "custom":
        raise InputError(CUSTOM_LOSS_MESSAGE)
    if not fwd.loss_fn_config:
        return None
    config = {}
    for key, value in fwd.loss_fn_config.items():
        if isinstance(value, str):
            raise InputError(
                f"loss_fn_config[{key!r}]: text value {value!r}; {fwd.loss_fn!r} takes numbers only"
            )
        config[key] = float(value)
    return config


CUSTOM_LOSS_MESSAGE = (
    "loss_fn 'custom' (a loss uploaded with create_custom_loss, named by loss_fn_config "
    "{'loss_id': ...}) is not supported: this server does not run custom losses server-side "
    "(client/config custom_loss_server_side is off). Pass the loss function itself to "
    "forward_backward_custom, which runs it client-side on the logprobs of a forward pass"
)
"""Why a ``custom`` loss fails (spec §6.4, §7): only the client-side mode (§7 A) works here."""


def forward_backward_output(group: GroupOutput) -> ForwardBackwardOutput:
    """The wire result of one request: per-datum ``logprobs``/``elementwise_loss``, ``loss:sum``."""
    outputs = [
        {
            "logprobs": _tensor(d.logprobs),
            "elementwise_loss": _tensor(d.elementwise_loss),
        }
        for d in group.outputs
    ]
    metrics = {k: float(v) for k, v in group.metrics.items()}
    return ForwardBackwardOutput(
        loss_fn_output_type="ArrayRecord", loss_fn_outputs=outputs, metrics=metrics
    )


def _tensor(arr: np.ndarray) -> TensorData:
    values = np.asarray(arr, dtype=np.float32)
    return TensorData(data=values.reshape(-1).tolist(), dtype="float32", shape=list(values.shape))


def adam_params(params: AdamParams) -> EngineAdamParams:
    """Engine optimizer hyper-parameters from the wire ``AdamParams`` (same field names)."""
    return EngineAdamParams(
        learning_rate=params.learning_rate,
        beta1=params.beta1,
        beta2=params.beta2,
        eps=params.eps,
        weight_decay=params.weight_decay,
        grad_clip_norm=params.grad_clip_norm,
    )


def sample_request_arrays(req: SampleRequest, slot: int | None) -> SampleRequestArrays:
    """Engine sample request for a wire ``asample`` body, sampling adapter ``slot`` (None: base).

    ``max_tokens`` absent stays None: the engine then generates up to its sequence limit.
    """
    try:
        tokens = np.asarray(req.prompt.to_ints(), dtype=np.int64)
    except ValueError as exc:
        raise InputError(f"prompt: {exc}") from None
    params = req.sampling_params
    want_prompt = bool(req.prompt_logprobs) or req.topk_prompt_logprobs > 0
    targets = req.target_prompt_logprobs
    return SampleRequestArrays(
        prompt_tokens=tokens,
        num_samples=req.num_samples,
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        seed=params.seed,
        stop=params.stop,
        adapter=slot,
        prompt_logprobs=want_prompt,
        topk_prompt_logprobs=req.topk_prompt_logprobs,
        topk_sample_logprobs=req.topk_sample_logprobs,
        target_prompt_logprobs=None if targets is None else _target_ids(targets),
        prompt_alt_tokens_k=req.prompt_alt_tokens_k,
        prompt_logprobs_last_n=req.prompt_logprobs_last_n,
    )


def _target_ids(td: TensorData) -> np.ndarray:
    """Dense ``[len(prompt)-1, K]`` ids; cells a CSR request leaves out are -1 (spec §5)."""
    values = tensor_data_to_numpy(td, keep_sparse=True).astype(np.int64)
    if td.sparse_crow_indices is None or td.sparse_col_indices is None:
        return values
    assert td.shape is not None  # CSR tensors are validated 2-D
    ids = np.full(td.shape, -1, dtype=np.int64)
    crow, col = td.sparse_crow_indices, td.sparse_col_indices
    for row in range(td.shape[0]):
        ids[row, col[crow[row] : crow[row + 1]]] = values[crow[row] : crow[row + 1]]
    return ids


def _target_scores(td: TensorData, scores: np.ndarray) -> TensorData:
    """Scores in the request's layout: the same shape, and the same CSR indices if sparse."""
    if td.sparse_crow_indices is None or td.sparse_col_indices is None:
        return _tensor(scores)
    crow, col = td.sparse_crow_indices, td.sparse_col_indices
    rows = np.repeat(np.arange(len(crow) - 1), np.diff(crow))
    values = np.asarray(scores, np.float32)[rows, col]
    return TensorData(
        data=values.tolist(),
        dtype="float32",
        shape=td.shape,
        sparse_crow_indices=crow,
        sparse_col_indices=col,
    )


def _optional_rows(
    rows: Sequence[list[tuple[int, float]]] | None, k: int
) -> list[list[tuple[int, float]] | None] | None:
    """Per-token top-k rows when ``k`` were asked for (the wire type allows None rows)."""
    return None if k <= 0 or rows is None else [list(row) for row in rows]


def sample_response(req: SampleRequest, result: SampleResult) -> SampleResponse:
    """The wire ``SampleResponse``: tokens include the stop token; scores only where asked.

    ``prompt_logprobs_last_n`` is applied by the engine (earlier positions come back None);
    position 0 is always None (nothing predicts the first token).
    """
    sequences = [
        SampledSequence(
            stop_reason=seq.stop_reason,
            tokens=[int(t) for t in seq.tokens],
            logprobs=[float(x) for x in seq.logprobs],
            topk_logprobs=_optional_rows(seq.topk_logprobs, req.topk_sample_logprobs),
        )
        for seq in result.sequences
    ]
    targets = None
    if req.target_prompt_logprobs is not None and result.target_prompt_logprobs is not None:
        targets = _target_scores(req.target_prompt_logprobs, result.target_prompt_logprobs)
    alt = None
    if req.prompt_alt_tokens_k > 0 and result.prompt_alt_tokens is not None:
        assert result.prompt_alt_logprobs is not None
        alt = PromptAltTokens(
            tokens=TensorData(
                data=result.prompt_alt_tokens.reshape(-1).tolist(),
                dtype="int64",
                shape=list(result.prompt_alt_tokens.shape),
            ),
            logprobs=_tensor(result.prompt_alt_logprobs),
        )
    return SampleResponse(
        sequences=sequences,
        prompt_logprobs=list(result.prompt_logprobs)
        if req.prompt_logprobs and result.prompt_logprobs is not None
        else None,
        topk_prompt_logprobs=result.topk_prompt_logprobs if req.topk_prompt_logprobs > 0 else None,
        target_prompt_logprobs=targets,
        prompt_alt_tokens=alt,
    )
