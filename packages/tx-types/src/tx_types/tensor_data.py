"""TensorData: a flattened numeric array with dtype, shape and optional sparse CSR layout.

Why a pydantic model holding a Python list (not a numpy array): this is the JSON form the SDK
sends (``target_prompt_logprobs``) and the typed form the protobuf codec fills, so it must
validate and serialise like any other wire type. ``to_numpy`` / ``from_numpy`` are the bridge to
array code. Values are kept exactly as given (a float32 tensor is not rounded on validation) so
objects round-trip through the SDK unchanged.

Invariants checked on construction (errors name the field): an ``int64`` tensor holds integers;
a dense tensor's ``shape`` multiplies to ``len(data)``; a CSR tensor has both index lists, a 2-D
``shape``, ``nrows + 1`` non-decreasing row pointers starting at 0 and ending at ``nnz``, and
in-range column indices. Unlisted CSR cells take ``pad_value`` when densified (0 for
``loss_fn_inputs``, -1 for ``target_prompt_logprobs``).

torch is optional and never imported at module import: ``to_torch`` / ``from_torch`` import it
lazily and raise ImportError when it is missing.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field, model_validator

from ._base import WireModel

__all__ = ["TensorData", "TensorDtype", "numpy_dtype_of", "tensor_dtype_of"]

TensorDtype = Literal["int64", "float32"]
"""The two public wire dtypes (bf16 and int32 are widened by the codecs)."""

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def numpy_dtype_of(dtype: TensorDtype) -> type[np.generic]:
    """The numpy scalar type of a wire dtype."""
    if dtype == "float32":
        return np.float32
    if dtype == "int64":
        return np.int64
    raise ValueError(f"Unsupported TensorDtype: {dtype!r}")


def tensor_dtype_of(dtype: np.dtype[Any]) -> TensorDtype:
    """The wire dtype of a numpy dtype: floats → float32, ints/bools → int64."""
    if dtype.kind == "f":
        return "float32"
    if dtype.kind in "iub":
        return "int64"
    raise ValueError(f"Unsupported numpy dtype: {dtype}")


def _check_pad_value(pad_value: Any) -> int:
    if isinstance(pad_value, bool) or not isinstance(pad_value, (int, np.integer)):
        raise TypeError(
            f"pad_value must be an integer, got {type(pad_value).__name__}: {pad_value!r}"
        )
    return int(pad_value)


class TensorData(WireModel):
    """A tensor on the wire. ``data`` is flattened row-major (only the listed values for CSR)."""

    data: list[int] | list[float]
    dtype: TensorDtype
    shape: list[Annotated[int, Field(ge=0)]] | None = None
    sparse_crow_indices: list[int] | None = None
    sparse_col_indices: list[int] | None = None

    @model_validator(mode="before")
    @classmethod
    def _accept_ndarray(cls, value: Any) -> Any:
        """Accept ``data=<ndarray>`` (as the SDK dataclass does); its shape fills ``shape``."""
        if isinstance(value, dict) and isinstance(value.get("data"), np.ndarray):
            array = value["data"]
            value = dict(value)
            if value.get("shape") is None and value.get("sparse_crow_indices") is None:
                value["shape"] = list(array.shape)
            value["data"] = array.ravel().tolist()
        return value

    @model_validator(mode="after")
    def _check_layout(self) -> TensorData:
        if self.dtype == "int64":
            self._coerce_integral()
        if (self.sparse_crow_indices is None) != (self.sparse_col_indices is None):
            raise ValueError(
                "sparse_crow_indices and sparse_col_indices must be set together (CSR layout)"
            )
        if self.sparse_crow_indices is not None:
            self._check_csr()
        elif self.shape is not None and math.prod(self.shape) != len(self.data):
            raise ValueError(
                f"shape {self.shape} holds {math.prod(self.shape)} elements but data has "
                f"{len(self.data)}"
            )
        return self

    def _coerce_integral(self) -> None:
        """An int64 tensor may arrive with integral floats (JSON ``1.0``); reject fractions."""
        if not self.data:
            return
        if any(isinstance(x, float) for x in self.data):
            bad = [x for x in self.data if not (math.isfinite(x) and float(x).is_integer())]
            if bad:
                raise ValueError(f"data of an int64 tensor must be integers, got {bad[0]!r}")
            object.__setattr__(self, "data", [int(x) for x in self.data])
        if min(self.data) < _INT64_MIN or max(self.data) > _INT64_MAX:
            raise ValueError("data of an int64 tensor must fit in 64 bits")

    def _check_csr(self) -> None:
        crow, col = self.sparse_crow_indices, self.sparse_col_indices
        assert crow is not None
        assert col is not None
        if self.shape is None or len(self.shape) != 2:
            raise ValueError(f"shape must be 2-D for a sparse CSR tensor, got {self.shape}")
        nrows, ncols = self.shape
        if len(crow) != nrows + 1:
            raise ValueError(
                f"sparse_crow_indices must have nrows + 1 = {nrows + 1} entries, got {len(crow)}"
            )
        crow_a = np.asarray(crow, dtype=np.int64)
        if crow_a[0] != 0 or np.any(np.diff(crow_a) < 0) or crow_a[-1] != len(col):
            raise ValueError(
                "sparse_crow_indices must start at 0, never decrease and end at "
                f"nnz = len(sparse_col_indices) = {len(col)}"
            )
        if len(self.data) != len(col):
            raise ValueError(
                f"data must hold one value per sparse_col_indices entry ({len(col)}), "
                f"got {len(self.data)}"
            )
        if col and (min(col) < 0 or max(col) >= ncols):
            raise ValueError(f"sparse_col_indices must lie in [0, {ncols})")

    @property
    def is_sparse(self) -> bool:
        return self.sparse_crow_indices is not None

    # ----------------------------------------------------------------- numpy bridge
    @classmethod
    def from_numpy(cls, array: npt.NDArray[Any]) -> TensorData:
        """Dense tensor from an array (floats → float32, integers/bools → int64)."""
        dtype = tensor_dtype_of(array.dtype)
        flat = np.ascontiguousarray(array, dtype=numpy_dtype_of(dtype)).ravel()
        return cls(data=flat.tolist(), dtype=dtype, shape=list(array.shape))

    @classmethod
    def from_numpy_sparse(cls, array: npt.NDArray[Any], pad_value: int = 0) -> TensorData:
        """CSR tensor from a 2-D array, leaving out ``pad_value`` cells; dense if not smaller.

        Same rule and value order (row-major) as the SDK's ``from_torch_sparse``.
        """
        pad_value = _check_pad_value(pad_value)
        if array.ndim != 2:
            return cls.from_numpy(array)
        nrows, ncols = array.shape
        rows, cols = np.nonzero(array != pad_value)
        if (nrows + 1) + 2 * len(rows) >= nrows * ncols:
            return cls.from_numpy(array)
        dtype = tensor_dtype_of(array.dtype)
        values = array[rows, cols].astype(numpy_dtype_of(dtype))
        crow = np.zeros(nrows + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=nrows), out=crow[1:])
        return cls(
            data=values.tolist(),
            dtype=dtype,
            shape=[nrows, ncols],
            sparse_crow_indices=crow.tolist(),
            sparse_col_indices=cols.tolist(),
        )

    def to_numpy(self, pad_value: int = 0) -> npt.NDArray[Any]:
        """A new array; a CSR tensor is densified with ``pad_value`` in unlisted cells."""
        np_dtype = numpy_dtype_of(self.dtype)
        values = np.asarray(self.data, dtype=np_dtype)
        if self.sparse_crow_indices is None:
            return values.reshape(self.shape) if self.shape is not None else values
        assert self.shape is not None
        assert self.sparse_col_indices is not None
        dense = np.full(self.shape, _check_pad_value(pad_value), dtype=np_dtype)
        crow = np.asarray(self.sparse_crow_indices, dtype=np.int64)
        rows = np.repeat(np.arange(self.shape[0]), np.diff(crow))
        dense[rows, np.asarray(self.sparse_col_indices, dtype=np.int64)] = values
        return dense

    def tolist(self, pad_value: int = 0) -> list[Any]:
        """Nested Python lists of the dense tensor."""
        result: list[Any] = self.to_numpy(pad_value).tolist()
        return result

    # ----------------------------------------------------------------- torch bridge
    @classmethod
    def from_torch(cls, tensor: Any) -> TensorData:
        """Dense tensor from a torch tensor (bfloat16 is widened to float32)."""
        import torch

        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        return cls.from_numpy(tensor.detach().cpu().contiguous().numpy())

    @classmethod
    def from_torch_sparse(cls, tensor: Any, pad_value: int = 0) -> TensorData:
        """CSR tensor from a 2-D torch tensor when that is smaller (see ``from_numpy_sparse``)."""
        import torch

        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        return cls.from_numpy_sparse(tensor.detach().cpu().contiguous().numpy(), pad_value)

    def to_torch(self, pad_value: int = 0) -> Any:
        """A torch tensor (CSR densified with ``pad_value``); ImportError without torch."""
        try:
            import torch
        except ImportError as exc:
            raise ImportError("PyTorch is not installed. Cannot convert to torch tensor.") from exc
        return torch.from_numpy(self.to_numpy(pad_value))
