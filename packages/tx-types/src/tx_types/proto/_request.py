"""``ForwardBackwardRequest``: server-side decoding and client-side encoding.

The server path turns SDK bytes into the pydantic wire types: zstd is undone with a hard output
cap, every tensor becomes a dense ``TensorData`` (CSR densified with 0 in unlisted cells, as the
spec requires for ``loss_fn_inputs``), and every failure becomes a ``ProtoDecodeError`` naming
the field. The client path mirrors the SDK's ``tinker.proto.request_conv`` byte for byte: CSR
tensors stay CSR, numeric loss config is dual-written to the legacy map and ``_v2``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard
from google.protobuf.message import DecodeError
from pydantic import ValidationError

from tx_types import (
    Datum,
    DmelChunk,
    EncodedTextChunk,
    ForwardBackwardInput,
    ImageChunk,
    ModelInput,
    ModelInputChunk,
    PromptProvenanceSpan,
    SampledProvenanceSpan,
    TensorData,
)
from tx_types.proto import tinker_public_pb2 as pb
from tx_types.proto._arrays import INT32, from_bytes, tensor_to_dense
from tx_types.proto._tensors import tensor_data_from_numpy, tensor_data_to_message
from tx_types.proto.errors import ProtoDecodeError, RequestTooLargeError, invalid

__all__ = [
    "DecodedForwardBackwardRequest",
    "decode_forward_backward_request",
    "encode_forward_backward_request",
]

DEFAULT_MAX_DECOMPRESSED_BYTES = 1 << 30


@dataclass(frozen=True, slots=True)
class DecodedForwardBackwardRequest:
    """A decoded ``/api/v1/forward_backward`` body (the SDK's ForwardBackwardRequest + flag)."""

    model_id: str
    seq_id: int | None
    """``None`` when the proto carried 0 (proto3 cannot tell 0 from unset; the SDK sends ≥ 1)."""
    forward_only: bool
    forward_backward_input: ForwardBackwardInput


def decode_forward_backward_request(
    body: bytes,
    content_encoding: str | None = None,
    *,
    max_decompressed_bytes: int = DEFAULT_MAX_DECOMPRESSED_BYTES,
    max_datums: int | None = None,
    max_tokens: int | None = None,
) -> DecodedForwardBackwardRequest:
    """Decode a ``forward_backward`` request body sent by the SDK (or tx-client).

    ``content_encoding`` is the HTTP ``Content-Encoding`` header: ``None``/``identity`` or
    ``zstd``. ``max_decompressed_bytes`` caps both the zstd output and the dense size of any CSR
    tensor, so a small malicious body cannot exhaust memory. ``max_datums`` / ``max_tokens``
    (None: no limit) cap the datums and the model-input tokens of all datums together; they
    are checked on the parsed message, before any datum is built. A body over a limit raises
    :class:`RequestTooLargeError`.
    """
    raw = _decompress(body, content_encoding, max_decompressed_bytes)
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(raw)
    except DecodeError as exc:
        raise ProtoDecodeError(
            f"ForwardBackwardRequest: not a valid protobuf message ({exc})"
        ) from None
    if not msg.model_id:
        raise ProtoDecodeError("ForwardBackwardRequest.model_id: missing")
    _check_size(msg, max_datums, max_tokens)
    data = [_decode_datum(d, f"data[{i}]", max_decompressed_bytes) for i, d in enumerate(msg.data)]
    try:
        # model_validate: loss_fn is an arbitrary string here, the Literal check is pydantic's.
        fwd_bwd_input = ForwardBackwardInput.model_validate(
            {"data": data, "loss_fn": msg.loss_fn, "loss_fn_config": _decode_loss_config(msg)}
        )
    except ValidationError as exc:
        raise invalid("ForwardBackwardRequest", exc) from None
    return DecodedForwardBackwardRequest(
        model_id=msg.model_id,
        seq_id=msg.seq_id or None,
        forward_only=msg.forward_only,
        forward_backward_input=fwd_bwd_input,
    )


def _check_size(
    msg: pb.ForwardBackwardRequest, max_datums: int | None, max_tokens: int | None
) -> None:
    if max_datums is not None and len(msg.data) > max_datums:
        raise RequestTooLargeError(
            f"ForwardBackwardRequest.data: {len(msg.data)} datums exceed the limit of "
            f"{max_datums} per request"
        )
    if max_tokens is not None:
        # encoded_text tokens travel as packed int32: 4 bytes each, counted without decoding.
        tokens = sum(
            len(chunk.encoded_text.tokens) // 4
            for datum in msg.data
            for chunk in datum.model_input
            if chunk.WhichOneof("chunk") == "encoded_text"
        )
        if tokens > max_tokens:
            raise RequestTooLargeError(
                f"ForwardBackwardRequest.data: {tokens} model-input tokens exceed the limit of "
                f"{max_tokens} per request"
            )


def _decompress(body: bytes, content_encoding: str | None, cap: int) -> bytes:
    encoding = (content_encoding or "identity").strip().lower()
    if encoding == "identity":
        if len(body) > cap:
            raise RequestTooLargeError(f"request body: {len(body)} bytes exceeds {cap}")
        return body
    if encoding != "zstd":
        raise ProtoDecodeError(f"Content-Encoding {content_encoding!r}: only zstd is supported")
    try:
        size = zstandard.frame_content_size(body)
        if size > cap:
            raise RequestTooLargeError(f"zstd body: decompressed size {size} exceeds {cap} bytes")
        # Without a size in the frame header, max_output_size is what bounds the allocation.
        return zstandard.ZstdDecompressor().decompress(body, max_output_size=cap)
    except zstandard.ZstdError as exc:
        raise ProtoDecodeError(
            f"zstd body: corrupt, truncated or larger than {cap} bytes ({exc})"
        ) from None


def _decode_loss_config(msg: pb.ForwardBackwardRequest) -> dict[str, float | str] | None:
    """Merge the legacy numeric map with ``loss_fn_config_v2``; v2 wins on shared keys."""
    config: dict[str, float | str] = dict(msg.loss_fn_config)
    for key, value in msg.loss_fn_config_v2.items():
        kind = value.WhichOneof("value")
        if kind is None:
            raise ProtoDecodeError(f"loss_fn_config_v2[{key!r}]: neither number nor text set")
        config[key] = value.number if kind == "number" else value.text
    return config or None


def _decode_datum(msg: pb.Datum, what: str, max_bytes: int) -> Datum:
    chunks: list[ModelInputChunk] = [
        _decode_chunk(c, f"{what}.model_input[{i}]") for i, c in enumerate(msg.model_input)
    ]
    spans = _decode_spans(msg.model_input_spans, f"{what}.model_input_spans")
    loss_spans = _decode_spans(msg.loss_fn_input_spans, f"{what}.loss_fn_input_spans")
    try:
        inputs: dict[str, TensorData] = {}
        for name, tensor in msg.loss_fn_inputs.items():
            where = f"{what}.loss_fn_inputs[{name!r}]"
            inputs[name] = tensor_data_from_numpy(*tensor_to_dense(tensor, where, max_bytes))
        # proto3 cannot tell "no provenance" from two empty lists; the SDK sends both or neither.
        has_spans = bool(spans or loss_spans)
        return Datum(
            model_input=ModelInput(chunks=chunks),
            loss_fn_inputs=inputs,
            model_input_spans=spans if has_spans else None,
            loss_fn_input_spans=loss_spans if has_spans else None,
        )
    except ValidationError as exc:
        raise invalid(what, exc) from None


_Span = PromptProvenanceSpan | SampledProvenanceSpan


def _decode_spans(spans: Iterable[pb.ProvenanceSpan], what: str) -> list[_Span]:
    out: list[_Span] = []
    for i, span in enumerate(spans):
        kind = span.WhichOneof("span")
        if kind is None:
            raise ProtoDecodeError(f"{what}[{i}]: neither prompt_tokens nor sampled_tokens set")
        arm = span.prompt_tokens if kind == "prompt_tokens" else span.sampled_tokens
        cls = PromptProvenanceSpan if kind == "prompt_tokens" else SampledProvenanceSpan
        try:
            out.append(cls(sequence_id=arm.sequence_id, offset=arm.offset, length=arm.length))
        except ValidationError as exc:
            raise invalid(f"{what}[{i}].{kind}", exc) from None
    return out


def _decode_chunk(msg: pb.Chunk, what: str) -> EncodedTextChunk | ImageChunk | DmelChunk:
    kind = msg.WhichOneof("chunk")
    try:
        if kind == "encoded_text":
            tokens = from_bytes(msg.encoded_text.tokens, INT32, f"{what}.encoded_text.tokens")
            return EncodedTextChunk(tokens=tokens.tolist())
        if kind == "image":
            image = msg.image
            expected = image.expected_tokens if image.HasField("expected_tokens") else None
            return ImageChunk(data=image.data, format=image.format, expected_tokens=expected)  # type: ignore[arg-type]
        if kind == "dmel":
            return DmelChunk(dmel=msg.dmel.dmel)
    except ValidationError as exc:
        raise invalid(what, exc) from None
    raise ProtoDecodeError(f"{what}: chunk has no encoded_text, image or dmel set")


def encode_forward_backward_request(
    model_id: str,
    seq_id: int | None,
    fwd_bwd_input: ForwardBackwardInput,
    forward_only: bool,
    compress: bool,
) -> bytes:
    """Encode a request body exactly as the SDK does; zstd-compress it when ``compress``.

    Send it with ``Content-Type: application/x-protobuf`` and, when compressed,
    ``Content-Encoding: zstd``.
    """
    msg = pb.ForwardBackwardRequest(
        model_id=model_id,
        seq_id=seq_id or 0,
        loss_fn=fwd_bwd_input.loss_fn,
        forward_only=forward_only,
    )
    _encode_loss_config(msg, fwd_bwd_input.loss_fn_config)
    for datum in fwd_bwd_input.data:
        _encode_datum(msg.data.add(), datum)
    body: bytes = msg.SerializeToString()
    return zstandard.ZstdCompressor().compress(body) if compress else body


def _encode_loss_config(msg: pb.ForwardBackwardRequest, config: Mapping[str, Any] | None) -> None:
    # Dual-write like the SDK: numbers in both maps (servers that only know the legacy map
    # still see them), strings only in v2.
    for key, value in (config or {}).items():
        if isinstance(value, str):
            msg.loss_fn_config_v2[key].text = value
        else:
            msg.loss_fn_config[key] = float(value)
            msg.loss_fn_config_v2[key].number = float(value)


def _encode_datum(msg: pb.Datum, datum: Datum) -> None:
    for chunk in datum.model_input.chunks:
        out = msg.model_input.add()
        if isinstance(chunk, EncodedTextChunk):
            out.encoded_text.tokens = np.asarray(chunk.tokens, dtype=INT32).tobytes()
        elif isinstance(chunk, ImageChunk):
            out.image.data = chunk.data
            out.image.format = chunk.format
            if chunk.expected_tokens is not None:
                out.image.expected_tokens = chunk.expected_tokens
        elif isinstance(chunk, DmelChunk):
            out.dmel.dmel = chunk.dmel
        else:
            raise ValueError(
                f"{type(chunk).__name__} cannot be sent in training data (upload the image bytes)"
            )
    for name, td in datum.loss_fn_inputs.items():
        msg.loss_fn_inputs[name].CopyFrom(tensor_data_to_message(td))
    for span in datum.model_input_spans or []:
        _encode_span(msg.model_input_spans.add(), span)
    for span in datum.loss_fn_input_spans or []:
        _encode_span(msg.loss_fn_input_spans.add(), span)


def _encode_span(msg: pb.ProvenanceSpan, span: _Span) -> None:
    arm = msg.sampled_tokens if isinstance(span, SampledProvenanceSpan) else msg.prompt_tokens
    arm.sequence_id = span.sequence_id
    arm.offset = span.offset
    arm.length = span.length
