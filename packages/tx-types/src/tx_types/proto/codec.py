"""Protobuf codec of the Tinker wire protocol (spec §5): the public entry points.

What goes over the wire as protobuf in SDK 0.38.0, and who calls what here:

=====================================  ==============================  =========================
message                                server (tx-server)              client (tx-client)
=====================================  ==============================  =========================
``ForwardBackwardRequest`` (+zstd)     ``decode_forward_backward_      ``encode_forward_backward_
                                       request``                       request``
``ForwardBackwardOutput``              ``encode_forward_backward_      ``decode_forward_backward_
                                       output``                        output``
``SampleResponse``                     ``encode_sample_response``      ``decode_sample_response``
=====================================  ==============================  =========================

All functions take and return the pydantic wire types of ``tx_types``; arrays move through
numpy (``np.frombuffer`` / ``tobytes``, explicit little-endian dtypes), never a Python loop per
element. Bad input raises ``ProtoDecodeError`` (a ``ValueError``) naming the field.

Why generated code, not a hand-written varint codec: the schema has 25 messages with maps,
oneofs and proto3 ``optional``; protoc's output (upb-backed) parses and serializes in C, is
exact on every edge of the wire format (packed/unpacked repeated fields, unknown fields, UTF-8
checks), and the committed ``.pyi`` gives mypy real types. The cost is a runtime dependency on
``protobuf`` (already required by the SDK) and a pinned generator, ``scripts/gen_proto.sh``
(grpcio-tools 1.75.1 -> gencode 6.31.1, hence ``protobuf>=6.31.1``).

Why the proto package is ``tx_types.tinker_public`` and not the SDK's ``tinker_public``: the SDK
registers ``tinker_public.*`` in protobuf's process-wide default descriptor pool, and the pool
refuses a second definition of the same full names, so a process that imports both the SDK and
tx-types (our tests, a user script, a server that also uses the SDK) would fail at import.
Loading our schema into a private pool would also work but needs hand-patching the generated
module. Renaming the package avoids both problems at no cost, because the binary wire format
depends only on field numbers and types; ``tests/test_proto_schema.py`` checks our descriptor
against the SDK's field for field, and the cross-codec tests exchange real bytes with the SDK.
"""

from __future__ import annotations

from tx_types.proto._output import decode_forward_backward_output, encode_forward_backward_output
from tx_types.proto._request import (
    DEFAULT_MAX_DECOMPRESSED_BYTES,
    DecodedForwardBackwardRequest,
    decode_forward_backward_request,
    encode_forward_backward_request,
)
from tx_types.proto._sample import decode_sample_response, encode_sample_response
from tx_types.proto._topk import MASK_LOGPROB
from tx_types.proto.errors import ProtoDecodeError, RequestTooLargeError

__all__ = [
    "DEFAULT_MAX_DECOMPRESSED_BYTES",
    "MASK_LOGPROB",
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
