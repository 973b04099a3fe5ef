"""Minimal safetensors reader/writer on NumPy (bfloat16 through ``ml_dtypes``).

Why our own: the ``safetensors`` NumPy backend cannot represent bfloat16, and its Flax backend
materialises every tensor on the default device. Reading the header ourselves gives a
memory-mapped host view per tensor, which the loader then places directly into its sharding
(each device copies only its slice).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from tx_engine.errors import CheckpointError

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def read_header(path: Path) -> tuple[dict[str, dict[str, object]], int]:
    """The tensor table of one file and the byte offset where tensor data starts.

    Checked against the file's size, so a truncated or corrupt file is a
    :class:`CheckpointError` naming it (category ``user``) instead of whatever a cut header or
    cut data happens to trigger later (a ``JSONDecodeError``, a numpy reshape error).
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors file")
        (n,) = struct.unpack("<Q", prefix)
        if n > size - 8:
            raise CheckpointError(
                f"{path}: header of {n} bytes but the file has {size} (truncated?)"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - n
    for name, info in header.items():
        _check_entry(path, name, info, data_bytes)
    return header, 8 + n


def _check_entry(path: Path, name: str, info: object, data_bytes: int) -> None:
    """One header entry: a known dtype, and offsets inside the data that match its shape."""
    try:
        dtype_name = str(info["dtype"])  # type: ignore[index]
        start, end = (int(x) for x in info["data_offsets"])  # type: ignore[index]
        shape = tuple(int(x) for x in info["shape"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}") from e
    if dtype_name not in _DTYPES:
        raise CheckpointError(f"{path.name}: tensor {name!r} has unsupported dtype {dtype_name}")
    expected = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype_name].itemsize
    if not 0 <= start <= end <= data_bytes or end - start != expected:
        raise CheckpointError(
            f"{path}: tensor {name!r} needs bytes {start}..{end} ({expected} for shape "
            f"{list(shape)}) of {data_bytes} data bytes (truncated or corrupt file)"
        )


def iter_tensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, array)`` pairs of one file; arrays are read-only memory maps."""
    header, base = read_header(path)
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    for name, info in header.items():
        start, end = (int(x) for x in info["data_offsets"])  # type: ignore[attr-defined]
        shape = tuple(int(x) for x in info["shape"])  # type: ignore[attr-defined]
        dtype = _DTYPES[str(info["dtype"])]
        yield name, raw[base + start : base + end].view(dtype).reshape(shape)


def checkpoint_files(model_dir: Path) -> list[Path]:
    """``model.safetensors`` or the shards listed by ``model.safetensors.index.json``."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map' object")
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    raise CheckpointError(
        f"{model_dir} has neither model.safetensors nor model.safetensors.index.json"
    )


def write_file(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """Write ``tensors`` as one safetensors file (names sorted, data 8-byte aligned header)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    # np.asarray keeps 0-d shapes (np.ascontiguousarray would make them 1-d).
    arrays = {k: np.asarray(v, order="C") for k, v in sorted(tensors.items())}
    for name, arr in arrays.items():
        header[name] = {
            "dtype": _NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays.values():
            f.write(arr.tobytes())
