"""``TensorData`` <-> numpy / proto ``Tensor``, keeping the SDK's layout rules.

Kept apart from ``_arrays`` so that module stays free of the pydantic types. ``TensorData.data``
is a flat Python list in the JSON wire type; conversion goes through one ``np.asarray`` /
``tolist`` call, never a Python loop per element.
"""

from __future__ import annotations

import numpy as np
from pydantic import ValidationError

from tx_types import TensorData
from tx_types.proto import tinker_public_pb2 as pb
from tx_types.proto._arrays import (
    INT64,
    WIRE_TO_NUMPY,
    AnyArray,
    decode_typed,
    from_bytes,
    tensor_message,
)
from tx_types.proto.errors import invalid

__all__ = [
    "tensor_data_from_message",
    "tensor_data_from_numpy",
    "tensor_data_to_message",
    "tensor_data_to_numpy",
]


def tensor_data_to_numpy(td: TensorData, *, keep_sparse: bool = False) -> AnyArray:
    """The values of ``td`` as an array of its declared dtype.

    Dense tensors come back in their ``shape`` (1-D when it is unset). CSR tensors come back as
    their flat listed values when ``keep_sparse``; otherwise they are refused, because results
    (``loss_fn_outputs``) are dense by contract and silently densifying would hide a bug.
    """
    dtype = WIRE_TO_NUMPY.get(td.dtype)
    if dtype is None:
        raise ValueError(f"unsupported tensor dtype {td.dtype!r} (expected float32 or int64)")
    values = np.asarray(td.data, dtype=dtype)
    if td.sparse_crow_indices is not None:
        if not keep_sparse:
            raise ValueError("expected a dense TensorData, got a sparse CSR one")
        return values.reshape(-1)
    if td.shape is not None:
        return values.reshape(td.shape)
    return values.reshape(-1)


def tensor_data_from_numpy(arr: AnyArray, wire: str) -> TensorData:
    """A dense ``TensorData`` holding ``arr`` with its shape."""
    return TensorData(data=arr.reshape(-1).tolist(), dtype=wire, shape=list(arr.shape))  # type: ignore[arg-type]


def tensor_data_to_message(td: TensorData) -> pb.Tensor:
    """Encode ``td`` keeping its layout (dense stays dense, CSR stays CSR), like the SDK."""
    return tensor_message(
        tensor_data_to_numpy(td, keep_sparse=True),
        td.dtype,
        td.shape,
        td.sparse_crow_indices,
        td.sparse_col_indices,
    )


def tensor_data_from_message(msg: pb.Tensor, what: str) -> TensorData:
    """Decode a response ``Tensor`` keeping a CSR layout sparse (the SDK's client behaviour)."""
    shape = [int(d) for d in msg.shape]
    try:
        if msg.WhichOneof("encoding") == "sparse_csr":
            csr = msg.sparse_csr
            values, wire = decode_typed(csr.values, msg.dtype, f"{what}.sparse_csr.values")
            crow = from_bytes(csr.crow_indices, INT64, f"{what}.sparse_csr.crow_indices")
            col = from_bytes(csr.col_indices, INT64, f"{what}.sparse_csr.col_indices")
            return TensorData(
                data=values.tolist(),
                dtype=wire,
                shape=shape,
                sparse_crow_indices=crow.tolist(),
                sparse_col_indices=col.tolist(),
            )
        values, wire = decode_typed(msg.dense, msg.dtype, f"{what}.dense")
        return TensorData(data=values.tolist(), dtype=wire, shape=shape or [values.size])
    except ValidationError as exc:
        raise invalid(what, exc) from None
