"""NumPy <-> protobuf byte-array helpers shared by the request, output and sample codecs.

Everything here works on whole arrays (``np.frombuffer`` / ``tobytes``, explicit little-endian
dtypes) so a 100k-token datum costs a few memcpys, never a Python loop per element. Nothing in
this module knows the pydantic wire types: it speaks numpy arrays and proto messages only, which
keeps every validation rule (item sizes, shapes, CSR invariants, byte offsets) in one place.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

from tx_types.proto import tinker_public_pb2 as pb
from tx_types.proto.errors import ProtoDecodeError

__all__ = [
    "FLOAT32",
    "INT32",
    "INT64",
    "WIRE_TO_NUMPY",
    "WIRE_TO_PROTO",
    "WireDtype",
    "batched_tensor",
    "decode_typed",
    "from_bytes",
    "split_batched",
    "tensor_message",
    "tensor_to_dense",
]

WireDtype = Literal["float32", "int64"]
AnyArray = npt.NDArray[np.generic]

FLOAT32 = np.dtype("<f4")
INT64 = np.dtype("<i8")
INT32 = np.dtype("<i4")
_BF16_BITS = np.dtype("<u2")

WIRE_TO_PROTO: dict[str, pb.DType] = {"float32": pb.DTYPE_FLOAT32, "int64": pb.DTYPE_INT64}
WIRE_TO_NUMPY: dict[str, np.dtype[np.generic]] = {"float32": FLOAT32, "int64": INT64}

# Proto dtype -> (dtype of the bytes on the wire, public dtype after widening). The public wire
# types only know float32/int64, exactly like the SDK's decoder: bf16 widens to float32, int32 to
# int64. DTYPE_UNSPECIFIED and unknown enum numbers are rejected.
_PROTO_DTYPES: dict[int, tuple[np.dtype[np.generic], WireDtype]] = {
    pb.DTYPE_FLOAT32: (FLOAT32, "float32"),
    pb.DTYPE_INT64: (INT64, "int64"),
    pb.DTYPE_INT32: (INT32, "int64"),
    pb.DTYPE_BFLOAT16: (_BF16_BITS, "float32"),
}


def from_bytes(buf: bytes, dtype: np.dtype[np.generic], what: str) -> AnyArray:
    """Read-only 1-D view of ``buf``; its length must be a whole number of items."""
    if len(buf) % dtype.itemsize:
        raise ProtoDecodeError(
            f"{what}: {len(buf)} bytes is not a multiple of the {dtype.name} item size "
            f"{dtype.itemsize}"
        )
    return np.frombuffer(buf, dtype=dtype)


def decode_typed(buf: bytes, proto_dtype: int, what: str) -> tuple[AnyArray, WireDtype]:
    """Decode ``buf`` declared as ``proto_dtype`` into a 1-D float32/int64 array."""
    entry = _PROTO_DTYPES.get(proto_dtype)
    if entry is None:
        raise ProtoDecodeError(
            f"{what}.dtype: unsupported value {proto_dtype} (expected FLOAT32, INT64, INT32 or "
            "BFLOAT16)"
        )
    src, wire = entry
    raw = from_bytes(buf, src, what)
    if src == _BF16_BITS:
        # bfloat16 is the upper half of a float32: shift into place, reinterpret.
        return (raw.astype(np.uint32) << 16).view(np.float32), wire
    return raw.astype(WIRE_TO_NUMPY[wire], copy=False), wire


def _check_shape(shape: Sequence[int], what: str) -> None:
    if any(d < 0 for d in shape):
        raise ProtoDecodeError(f"{what}.shape: negative dimension in {list(shape)}")


def tensor_to_dense(msg: pb.Tensor, what: str, max_bytes: int) -> tuple[AnyArray, WireDtype]:
    """Decode a request ``Tensor`` to a dense array (CSR densified, unlisted cells 0).

    An empty ``shape`` means 1-D (the SDK omits it for plain lists). ``max_bytes`` bounds the
    densified size, because a tiny CSR message can declare a huge dense shape.
    """
    which = msg.WhichOneof("encoding")
    if which == "sparse_csr":
        csr = msg.sparse_csr
        values, wire = decode_typed(csr.values, msg.dtype, f"{what}.sparse_csr.values")
        dense = _csr_to_dense(values, csr, list(msg.shape), what, max_bytes)
        return dense, wire
    values, wire = decode_typed(msg.dense, msg.dtype, f"{what}.dense")
    shape = list(msg.shape) or [values.size]
    _check_shape(shape, what)
    if math.prod(shape) != values.size:
        raise ProtoDecodeError(
            f"{what}.shape: {shape} needs {math.prod(shape)} elements but the data holds "
            f"{values.size}"
        )
    return values.reshape(shape), wire


def _csr_to_dense(
    values: AnyArray, csr: pb.SparseCsr, shape: list[int], what: str, max_bytes: int
) -> AnyArray:
    if len(shape) != 2:
        raise ProtoDecodeError(f"{what}.shape: a sparse CSR tensor needs a 2-D shape, got {shape}")
    _check_shape(shape, what)
    nrows, ncols = shape
    if nrows * ncols * values.dtype.itemsize > max_bytes:
        raise ProtoDecodeError(f"{what}.shape: dense size of {shape} exceeds {max_bytes} bytes")
    crow = from_bytes(csr.crow_indices, INT64, f"{what}.sparse_csr.crow_indices")
    col = from_bytes(csr.col_indices, INT64, f"{what}.sparse_csr.col_indices")
    nnz = values.size
    counts = np.diff(crow)
    if crow.size != nrows + 1 or crow[0] != 0 or crow[-1] != nnz or np.any(counts < 0):
        raise ProtoDecodeError(
            f"{what}.sparse_csr.crow_indices: expected {nrows + 1} non-decreasing row pointers "
            f"from 0 to {nnz} (the number of values)"
        )
    if col.size != nnz:
        raise ProtoDecodeError(
            f"{what}.sparse_csr.col_indices: {col.size} column indices for {nnz} values"
        )
    rows = np.repeat(np.arange(nrows), counts)
    if nnz and (col.min() < 0 or col.max() >= ncols):
        raise ProtoDecodeError(f"{what}.sparse_csr.col_indices: column out of range [0, {ncols})")
    if np.any(np.diff(col)[rows[1:] == rows[:-1]] <= 0):
        # Duplicates would make the densified value depend on write order.
        raise ProtoDecodeError(
            f"{what}.sparse_csr.col_indices: columns must be strictly increasing within a row"
        )
    dense = np.zeros((nrows, ncols), dtype=values.dtype)
    dense[rows, col] = values
    return dense


def tensor_message(
    values: AnyArray,
    wire: str,
    shape: Sequence[int] | None,
    crow: Sequence[int] | None = None,
    col: Sequence[int] | None = None,
) -> pb.Tensor:
    """Encode flat ``values`` (+ optional CSR indices) the way the SDK's request encoder does."""
    proto_dtype = WIRE_TO_PROTO.get(wire)
    if proto_dtype is None:
        raise ValueError(f"unsupported tensor dtype {wire!r} (expected float32 or int64)")
    msg = pb.Tensor(dtype=proto_dtype)
    if shape is not None:
        msg.shape.extend(int(d) for d in shape)
    data = np.ascontiguousarray(values, dtype=WIRE_TO_NUMPY[wire]).tobytes()
    if crow is not None:
        if col is None:
            raise ValueError("sparse_col_indices is required with sparse_crow_indices")
        msg.sparse_csr.values = data
        msg.sparse_csr.crow_indices = np.asarray(crow, dtype=INT64).tobytes()
        msg.sparse_csr.col_indices = np.asarray(col, dtype=INT64).tobytes()
    else:
        msg.dense = data
    return msg


def batched_tensor(
    arrays: Sequence[AnyArray], wire: str, trailing: Sequence[int]
) -> pb.BatchedTensor:
    """Concatenate per-datum arrays into one ``BatchedTensor`` with BYTE offsets."""
    dtype = WIRE_TO_NUMPY[wire]
    flats = [np.ascontiguousarray(a, dtype=dtype).reshape(-1) for a in arrays]
    sizes = np.fromiter((f.size for f in flats), dtype=np.int64, count=len(flats))
    offsets = np.zeros(len(flats) + 1, dtype=INT64)
    np.cumsum(sizes * dtype.itemsize, out=offsets[1:])
    data = np.concatenate(flats).tobytes() if flats else b""
    return pb.BatchedTensor(
        data=data,
        offsets=offsets.tobytes(),
        dtype=WIRE_TO_PROTO[wire],
        trailing_shape=[int(d) for d in trailing],
    )


def split_batched(
    bt: pb.BatchedTensor, what: str, num_datums: int | None
) -> tuple[list[AnyArray], WireDtype]:
    """Split a ``BatchedTensor`` into per-datum arrays shaped ``[-1, *trailing_shape]``.

    ``num_datums=None`` trusts the offsets (records written before ``num_datums`` existed).
    """
    entry = _PROTO_DTYPES.get(bt.dtype)
    if entry is None:
        raise ProtoDecodeError(f"{what}.dtype: unsupported value {bt.dtype}")
    itemsize = entry[0].itemsize
    values, wire = decode_typed(bt.data, bt.dtype, f"{what}.data")
    offsets = from_bytes(bt.offsets, INT64, f"{what}.offsets")
    if num_datums is None:
        num_datums = max(offsets.size - 1, 0)
    if (
        offsets.size != num_datums + 1
        or (offsets.size and (offsets[0] != 0 or offsets[-1] != len(bt.data)))
        or np.any(np.diff(offsets) < 0)
        or np.any(offsets % itemsize)
    ):
        raise ProtoDecodeError(
            f"{what}.offsets: expected {num_datums + 1} non-decreasing byte offsets from 0 to "
            f"{len(bt.data)}, multiples of {itemsize}"
        )
    trailing = [int(d) for d in bt.trailing_shape]
    _check_shape(trailing, what)
    per_row = math.prod(trailing)
    bounds = (offsets // itemsize).tolist()
    out: list[AnyArray] = []
    for start, end in itertools.pairwise(bounds):
        if (end - start) % per_row if per_row else end != start:
            raise ProtoDecodeError(
                f"{what}: {end - start} elements do not fill rows of trailing shape {trailing}"
            )
        leading = (end - start) // per_row if per_row else 0
        out.append(values[start:end].reshape([leading, *trailing]))
    return out, wire
