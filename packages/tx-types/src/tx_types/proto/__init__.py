"""Protobuf codec of the Tinker wire protocol; see ``tx_types.proto.codec`` for the design.

Content types: request bodies and the two protobuf future results are
``application/x-protobuf``; request bodies may be ``Content-Encoding: zstd``.
"""

from __future__ import annotations

from tx_types.proto.codec import (
    DEFAULT_MAX_DECOMPRESSED_BYTES,
    MASK_LOGPROB,
    DecodedForwardBackwardRequest,
    ProtoDecodeError,
    RequestTooLargeError,
    decode_forward_backward_output,
    decode_forward_backward_request,
    decode_sample_response,
    encode_forward_backward_output,
    encode_forward_backward_request,
    encode_sample_response,
)

PROTOBUF_CONTENT_TYPE = "application/x-protobuf"

__all__ = [
    "DEFAULT_MAX_DECOMPRESSED_BYTES",
    "MASK_LOGPROB",
    "PROTOBUF_CONTENT_TYPE",
    "DecodedForwardBackwardRequest",
    "ProtoDecodeError",
    "RequestTooLargeError",
    "decode_forward_backward_output",
    "decode_forward_backward_request",
    "decode_sample_response",
    "encode_forward_backward_output",
    "encode_forward_backward_request",
    "encode_sample_response",
]
