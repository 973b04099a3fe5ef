"""The one exception the protobuf codec raises for bad wire input."""

from __future__ import annotations

from pydantic import ValidationError

from tx_types.errors import TxTypesError

__all__ = ["ProtoDecodeError", "RequestTooLargeError", "invalid"]


class ProtoDecodeError(TxTypesError, ValueError):
    """Bytes that cannot be turned into a valid Tinker message.

    Raised for undecodable protobuf, bad zstd, unknown dtypes, inconsistent shapes or sparse
    indices, and values the wire types reject. It is a ``TxTypesError`` (the package root) and a
    ``ValueError``, so callers that only know the builtin still catch it; the server maps it to a *user* error (HTTP 400),
    because it always means the client sent something malformed. The message names the field.
    """


class RequestTooLargeError(ProtoDecodeError):
    """A well-formed message over a size limit the decoder was given (datums, tokens, bytes).

    A ``ProtoDecodeError`` so callers that only catch that still reject it; raised before the
    datums are built, so an oversized body costs no more than its protobuf parse.
    """


def invalid(what: str, exc: ValidationError) -> ProtoDecodeError:
    """A ProtoDecodeError for a wire-type validation failure, one line per pydantic error.

    Pydantic's own message repeats the whole input (possibly megabytes of tokens); this keeps
    the field path and the reason only.
    """
    reasons = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(part) for part in error["loc"])
        reasons.append(f"{loc}: {error['msg']}" if loc else error["msg"])
    return ProtoDecodeError(f"{what}: {'; '.join(reasons)}")
