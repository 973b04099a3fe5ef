"""Client-side chunking of forward/backward batches (spec §4.2), identical to the SDK's.

A batch becomes several requests, one ``seq_id`` each, so no single body exceeds the server's
limits from ``client/config``: a new chunk starts when the current one holds
``fwdbwd_max_chunk_len`` datums, or when adding the next datum would push its *estimated*
protobuf size past ``fwdbwd_max_chunk_bytes_count`` (a first datum is always accepted, however
big). The estimate counts 4 bytes per token, raw bytes of images/audio/asset locations, the
tensor bytes in their declared dtype, and 8 bytes per sparse CSR index.
"""

from __future__ import annotations

import numpy as np

from tx_types import (
    Datum,
    DmelChunk,
    ImageAssetPointerChunk,
    ImageChunk,
    ModelInputChunk,
    TensorData,
    numpy_dtype_of,
)

__all__ = ["chunk_data", "estimate_datum_bytes"]

_BYTES_PER_TOKEN = 4  # tokens travel as int32
_SPARSE_INDEX_BYTES = 8  # CSR indices travel as int64


def _chunk_bytes(chunk: ModelInputChunk) -> int:
    if isinstance(chunk, DmelChunk):
        return len(chunk.dmel)
    if isinstance(chunk, ImageChunk):
        return len(chunk.data)
    if isinstance(chunk, ImageAssetPointerChunk):
        return len(chunk.location)
    return chunk.length * _BYTES_PER_TOKEN


def _tensor_bytes(tensor: TensorData) -> int:
    itemsize = np.dtype(numpy_dtype_of(tensor.dtype)).itemsize
    total = len(tensor.data) * itemsize
    for indices in (tensor.sparse_crow_indices, tensor.sparse_col_indices):
        if indices is not None:
            total += _SPARSE_INDEX_BYTES * len(indices)
    return total


def estimate_datum_bytes(datum: Datum) -> int:
    """Estimated protobuf bytes of one datum (the SDK's formula)."""
    return sum(_chunk_bytes(c) for c in datum.model_input.chunks) + sum(
        _tensor_bytes(t) for t in datum.loss_fn_inputs.values()
    )


def chunk_data(data: list[Datum], max_len: int, max_bytes: int) -> list[list[Datum]]:
    """Split ``data`` into request-sized chunks, preserving order."""
    if max_len < 1:
        raise ValueError(f"fwdbwd_max_chunk_len must be >= 1, got {max_len}")
    chunks: list[list[Datum]] = []
    current: list[Datum] = []
    current_bytes = 0
    for datum in data:
        size = estimate_datum_bytes(datum)
        if (current and current_bytes + size > max_bytes) or len(current) == max_len:
            chunks.append(current)
            current, current_bytes = [], 0
        current.append(datum)
        current_bytes += size
    if current:
        chunks.append(current)
    return chunks
