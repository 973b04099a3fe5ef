"""ModelInput and its chunks: the token/image/audio sequence fed to a model.

Why a callable discriminator instead of a plain tagged union: the SDK always sends the
``type`` tag, but its own pydantic union is *not* tagged (it picks by shape), so a hand-written
``{"tokens": [...]}`` is valid for it. We dispatch on ``type`` when present and otherwise on the
distinctive key, and the same function reads SDK objects (``from_attributes``).

Token ids are strict non-negative ints. ``ImageChunk.data`` / ``DmelChunk.dmel`` are bytes in
Python and base64 strings in JSON (what the SDK sends); in protobuf they are raw bytes.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_serializer, field_validator

from ._base import TokenIds, WireModel

__all__ = [
    "DmelChunk",
    "EncodedTextChunk",
    "ImageAssetPointerChunk",
    "ImageChunk",
    "ModelInput",
    "ModelInputChunk",
    "tensor_container_shape",
]


class EncodedTextChunk(WireModel):
    """A run of already-tokenized text."""

    tokens: TokenIds
    type: Literal["encoded_text"] = "encoded_text"

    @property
    def length(self) -> int:
        return len(self.tokens)


def _b64_to_bytes(value: Any, field: str) -> Any:
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"{field} must be base64-encoded bytes: {exc}") from None
    return value


class ImageChunk(WireModel):
    """An inline image; ``expected_tokens`` is advisory (the server computes the real count)."""

    data: bytes
    format: Literal["png", "jpeg"]
    expected_tokens: Annotated[int, Field(ge=0)] | None = None
    type: Literal["image"] = "image"

    @field_validator("data", mode="before")
    @classmethod
    def _decode_data(cls, value: Any) -> Any:
        return _b64_to_bytes(value, "data")

    @field_serializer("data")
    def _encode_data(self, value: bytes) -> str:
        return base64.b64encode(value).decode("ascii")

    @property
    def length(self) -> int:
        if self.expected_tokens is None:
            raise ValueError(
                "ImageChunk expected_tokens needs to be set in order to compute the length"
            )
        return self.expected_tokens


class ImageAssetPointerChunk(WireModel):
    """An image referenced by path or URL (sampling only; never valid in training data)."""

    format: Literal["png", "jpeg"]
    location: str
    expected_tokens: Annotated[int, Field(ge=0)] | None = None
    type: Literal["image_asset_pointer"] = "image_asset_pointer"

    @property
    def length(self) -> int:
        if self.expected_tokens is None:
            raise ValueError(
                "ImageAssetPointerChunk expected_tokens needs to be set in order to compute "
                "the length"
            )
        return self.expected_tokens


class DmelChunk(WireModel):
    """Audio model tokens as serialized TensorContainer bytes; its length is dim 0 of them."""

    dmel: bytes
    type: Literal["dmel"] = "dmel"

    @field_validator("dmel", mode="before")
    @classmethod
    def _decode_dmel(cls, value: Any) -> Any:
        return _b64_to_bytes(value, "dmel")

    @field_serializer("dmel")
    def _encode_dmel(self, value: bytes) -> str:
        return base64.b64encode(value).decode("ascii")

    @property
    def length(self) -> int:
        shape = tensor_container_shape(self.dmel)
        if not shape:
            raise ValueError("DmelChunk tensor has no dimension 0")
        return shape[0]


_CONSTANT_TENSOR_MARKER = 254
_MAX_DTYPE_BYTE = 7


def tensor_container_shape(data: bytes) -> tuple[int, ...]:
    """Read the shape from a TensorContainer header (marker?, dtype byte, varint ndim, dims).

    Mirrors the SDK reader so ``DmelChunk.length`` agrees with it without decoding the payload.
    """
    if not data:
        raise ValueError("TensorContainer bytes are empty")
    offset = 1 if data[0] == _CONSTANT_TENSOR_MARKER else 0
    if offset >= len(data):
        raise ValueError("Truncated TensorContainer header")
    if data[offset] > _MAX_DTYPE_BYTE:
        raise ValueError(f"Unknown TensorContainer dtype byte: {data[offset]}")
    ndim, offset = _read_varint(data, offset + 1)
    shape = []
    for _ in range(ndim):
        dim, offset = _read_varint(data, offset)
        shape.append(dim)
    return tuple(shape)


def _read_varint(data: bytes, offset: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if offset >= len(data):
            raise ValueError("Truncated TensorContainer header")
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, offset
        shift += 7
        if shift > 63:
            raise ValueError("TensorContainer varint is too long")


_KEY_TO_CHUNK_TYPE = {
    "tokens": "encoded_text",
    "location": "image_asset_pointer",
    "data": "image",
    "dmel": "dmel",
}


def _chunk_type(value: Any) -> str | None:
    """Pick the chunk class: explicit ``type`` first, else the class's distinctive field."""
    if isinstance(value, dict):
        tag = value.get("type")
        keys: Any = value.keys()
    else:
        tag = getattr(value, "type", None)
        keys = [k for k in _KEY_TO_CHUNK_TYPE if hasattr(value, k)]
    if tag is not None:
        return str(tag)
    for key in keys:
        if key in _KEY_TO_CHUNK_TYPE:
            return _KEY_TO_CHUNK_TYPE[key]
    return None


ModelInputChunk = Annotated[
    Annotated[EncodedTextChunk, Tag("encoded_text")]
    | Annotated[ImageAssetPointerChunk, Tag("image_asset_pointer")]
    | Annotated[ImageChunk, Tag("image")]
    | Annotated[DmelChunk, Tag("dmel")],
    Discriminator(_chunk_type),
]
"""One chunk of a ModelInput, selected by its ``type`` tag."""


class ModelInput(WireModel):
    """A prompt or training sequence: a list of chunks whose lengths add up to ``length``."""

    chunks: list[ModelInputChunk]

    @classmethod
    def from_ints(cls, tokens: list[int]) -> ModelInput:
        """Build a text-only input from token ids."""
        return cls(chunks=[EncodedTextChunk(tokens=tokens)])

    def to_ints(self) -> list[int]:
        """All token ids; raises ValueError when a chunk is not text."""
        if not all(isinstance(chunk, EncodedTextChunk) for chunk in self.chunks):
            kinds = [type(chunk).__name__ for chunk in self.chunks]
            raise ValueError(f"to_ints only supported for EncodedTextChunks, got {kinds}")
        return [
            t for chunk in self.chunks if isinstance(chunk, EncodedTextChunk) for t in chunk.tokens
        ]

    @property
    def length(self) -> int:
        """Total context length (image chunks need ``expected_tokens``)."""
        return sum(chunk.length for chunk in self.chunks)

    @classmethod
    def empty(cls) -> ModelInput:
        return cls(chunks=[])

    def append(self, chunk: ModelInputChunk) -> ModelInput:
        """Return a new ModelInput with ``chunk`` added at the end."""
        return ModelInput(chunks=[*self.chunks, chunk])

    def append_int(self, token: int) -> ModelInput:
        """Return a new ModelInput with one more token (as its own chunk, like the SDK)."""
        return self.append(EncodedTextChunk(tokens=[token]))
