"""Shared pydantic configuration and small field types of every wire model.

Why one base for requests *and* responses: the official SDK forbids unknown fields on the
requests it builds, but a server must accept and ignore them (every SDK body carries a literal
``type``; newer SDKs add fields), and a client must ignore new response fields. So every model
here uses ``extra="ignore"``. Models are frozen like the SDK's, so a value that was validated
stays valid; use ``model_copy(update=...)`` to derive a new one.

``from_attributes=True`` lets ``X.model_validate(obj)`` read any object with the same attribute
names, e.g. an instance of the SDK's ``tinker.types.X`` (including its frozen dataclasses), which
makes converting between the two libraries a one-liner.
"""

from __future__ import annotations

import operator
from typing import Annotated, Any

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    WrapValidator,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "FLOAT32_MAX",
    "FiniteFloat",
    "Float32",
    "Int32",
    "Int64",
    "ModelID",
    "RequestID",
    "TokenId",
    "TokenIds",
    "WireModel",
]

ModelID = str
"""A training model id, ``{session_id}:train:{model_seq_id}`` on this server."""

RequestID = str
"""An opaque future id. Always a JSON string: the SDK rejects an int."""


class WireModel(BaseModel):
    """Base of every JSON wire type: frozen, ignores unknown fields, readable from attributes."""

    model_config = ConfigDict(
        frozen=True,
        extra="ignore",
        from_attributes=True,
        protected_namespaces=(),
    )

    def __str__(self) -> str:
        return repr(self)


FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
"""A float that must not be NaN or ±inf (optimizer and sampling hyper-parameters)."""

FLOAT32_MAX = 3.4028234663852886e38
"""The largest finite float32."""


def _fits_float32(value: float) -> float:
    if abs(value) > FLOAT32_MAX:
        raise ValueError(f"{value!r} does not fit in float32 (|value| <= {FLOAT32_MAX:.8g})")
    return value


Float32 = Annotated[float, Field(allow_inf_nan=False), AfterValidator(_fits_float32)]
"""A finite float that fits float32. The engine computes in float32, where a larger
hyper-parameter (a learning rate of 1e308) becomes inf and poisons the weights."""

Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
"""An int the server stores in a BIGINT column (``seq_id``): JSON ints are unbounded, and a
larger one would fail in the database, after validation, as a server error."""

Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
"""An int the server stores in an INTEGER column (``model_seq_id``, 32 bits on PostgreSQL)."""


def _as_token_ids(value: Any, handler: Any, info: ValidationInfo) -> list[int]:
    """Validate token ids: non-negative ints (numpy integers accepted, floats/bools rejected).

    The fast path is pydantic-core's strict ``list[int >= 0]`` (Rust); only when it fails do we
    retry after converting numpy arrays/integers, so long prompts stay cheap to validate.
    """
    try:
        result: list[int] = handler(value)
        return result
    except Exception:
        if isinstance(value, np.ndarray):
            if value.dtype.kind not in "iu" or value.ndim != 1:
                raise PydanticCustomError(
                    "token_ids",
                    "token ids must be a 1-D integer array, got dtype {dtype} ndim {ndim}",
                    {"dtype": str(value.dtype), "ndim": value.ndim},
                ) from None
            converted: Any = value.tolist()
        elif isinstance(value, (list, tuple)) and any(isinstance(x, np.integer) for x in value):
            converted = [operator.index(x) if isinstance(x, np.integer) else x for x in value]
        else:
            raise
        retried: list[int] = handler(converted)
        return retried


TokenId = Annotated[int, Field(ge=0, strict=True)]
"""One token id: a non-negative Python int (no floats, no bools, no numeric strings)."""

TokenIds = Annotated[list[TokenId], WrapValidator(_as_token_ids)]
"""A list of token ids; numpy integer arrays are accepted and converted."""
