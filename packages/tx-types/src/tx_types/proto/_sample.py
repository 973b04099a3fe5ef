"""``SampleResponse``: server-side encoding and client-side decoding (spec §5.3).

Wire conventions the pydantic view does not show: ``prompt_logprobs`` is float32 with NaN for
``None`` (position 0 and unscored positions); top-k rows are dense matrices with the
``(0, -99999.0)`` sentinel (see ``_topk``); ``target_prompt_logprobs`` keeps the request's layout
(CSR stays CSR); ``sequence_id`` is not on the wire at all — identity comes from the
``sample_sequence_ids`` of the ``asample`` answer, so the client decoder takes them as an
argument.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from google.protobuf.message import DecodeError
from pydantic import ValidationError

from tx_types import PromptAltTokens, SampledSequence, SampleResponse
from tx_types.proto import tinker_public_pb2 as pb
from tx_types.proto._arrays import FLOAT32, INT32, from_bytes
from tx_types.proto._tensors import tensor_data_from_message, tensor_data_to_message
from tx_types.proto._topk import topk_from_message, topk_to_message
from tx_types.proto.errors import ProtoDecodeError, invalid

__all__ = ["decode_sample_response", "encode_sample_response"]

_STOP_TO_PROTO = {"stop": pb.STOP_REASON_STOP, "length": pb.STOP_REASON_LENGTH}
_PROTO_TO_STOP = {v: k for k, v in _STOP_TO_PROTO.items()}


def encode_sample_response(resp: SampleResponse) -> bytes:
    """Serialize ``resp`` for ``retrieve_future`` (``Content-Type: application/x-protobuf``)."""
    msg = pb.SampleResponse(prompt_cache_hit_tokens=resp.prompt_cache_hit_tokens)
    for seq in resp.sequences:
        _encode_sequence(msg.sequences.add(), seq)
    if resp.prompt_logprobs is not None:
        # None -> NaN in one numpy conversion (float dtype maps None to NaN).
        msg.prompt_logprobs = np.asarray(resp.prompt_logprobs, dtype=FLOAT32).tobytes()
    if resp.topk_prompt_logprobs is not None:
        msg.topk_prompt_logprobs.CopyFrom(topk_to_message(resp.topk_prompt_logprobs))
    if resp.target_prompt_logprobs is not None:
        msg.target_prompt_logprobs.CopyFrom(tensor_data_to_message(resp.target_prompt_logprobs))
    if resp.prompt_alt_tokens is not None:
        msg.prompt_alt_tokens.tokens.CopyFrom(tensor_data_to_message(resp.prompt_alt_tokens.tokens))
        msg.prompt_alt_tokens.logprobs.CopyFrom(
            tensor_data_to_message(resp.prompt_alt_tokens.logprobs)
        )
    body: bytes = msg.SerializeToString()
    return body


def _encode_sequence(msg: pb.SampledSequence, seq: SampledSequence) -> None:
    msg.stop_reason = _STOP_TO_PROTO[seq.stop_reason]
    msg.tokens = np.asarray(seq.tokens, dtype=INT32).tobytes()
    if seq.logprobs is not None:
        msg.logprobs = np.asarray(seq.logprobs, dtype=FLOAT32).tobytes()
    if seq.topk_logprobs is not None:
        msg.topk_sampled_logprobs.CopyFrom(topk_to_message(seq.topk_logprobs))


def decode_sample_response(
    body: bytes, sequence_ids: Sequence[str] | None = None
) -> SampleResponse:
    """Parse a protobuf ``SampleResponse`` the way the SDK 0.38.0 client does.

    ``sequence_ids`` (the ``sample_sequence_ids`` of the ``asample`` answer, one per sequence)
    stamp each ``SampledSequence.sequence_id``; without them the ids stay ``None``.
    """
    msg = pb.SampleResponse()
    try:
        msg.ParseFromString(body)
    except DecodeError as exc:
        raise ProtoDecodeError(f"SampleResponse: not a valid protobuf message ({exc})") from None
    ids: list[str | None] = (
        list(sequence_ids) if sequence_ids is not None else [None] * len(msg.sequences)
    )
    if len(ids) != len(msg.sequences):
        raise ProtoDecodeError(
            f"SampleResponse.sequences: {len(msg.sequences)} sequences for {len(ids)} sequence ids"
        )
    try:
        sequences = [
            _decode_sequence(seq, f"sequences[{i}]", ids[i]) for i, seq in enumerate(msg.sequences)
        ]
        return SampleResponse(
            sequences=sequences,
            prompt_logprobs=_prompt_logprobs(msg.prompt_logprobs),
            topk_prompt_logprobs=(
                topk_from_message(msg.topk_prompt_logprobs, "topk_prompt_logprobs")
                if msg.HasField("topk_prompt_logprobs")
                else None
            ),
            target_prompt_logprobs=(
                tensor_data_from_message(msg.target_prompt_logprobs, "target_prompt_logprobs")
                if msg.HasField("target_prompt_logprobs")
                else None
            ),
            prompt_alt_tokens=_prompt_alt_tokens(msg),
            prompt_cache_hit_tokens=msg.prompt_cache_hit_tokens,
        )
    except ValidationError as exc:
        raise invalid("SampleResponse", exc) from None


def _decode_sequence(
    msg: pb.SampledSequence, what: str, sequence_id: str | None
) -> SampledSequence:
    stop_reason = _PROTO_TO_STOP.get(msg.stop_reason)
    if stop_reason is None:
        raise ProtoDecodeError(f"{what}.stop_reason: unknown enum value {msg.stop_reason}")
    # The SDK treats empty logprobs bytes as "not requested"; so do we.
    logprobs = from_bytes(msg.logprobs, FLOAT32, f"{what}.logprobs") if msg.logprobs else None
    return SampledSequence(
        stop_reason=stop_reason,  # type: ignore[arg-type]
        sequence_id=sequence_id,
        tokens=from_bytes(msg.tokens, INT32, f"{what}.tokens").tolist(),
        logprobs=logprobs.tolist() if logprobs is not None else None,
        topk_logprobs=(
            topk_from_message(msg.topk_sampled_logprobs, f"{what}.topk_sampled_logprobs")
            if msg.HasField("topk_sampled_logprobs")
            else None
        ),
    )


def _prompt_logprobs(buf: bytes) -> list[float | None] | None:
    if not buf:
        return None
    values = from_bytes(buf, FLOAT32, "prompt_logprobs")
    out: list[float | None] = values.tolist()
    for i in np.flatnonzero(np.isnan(values)).tolist():
        out[i] = None
    return out


def _prompt_alt_tokens(msg: pb.SampleResponse) -> PromptAltTokens | None:
    if not msg.HasField("prompt_alt_tokens"):
        return None
    alt = msg.prompt_alt_tokens
    return PromptAltTokens(
        tokens=tensor_data_from_message(alt.tokens, "prompt_alt_tokens.tokens"),
        logprobs=tensor_data_from_message(alt.logprobs, "prompt_alt_tokens.logprobs"),
    )
