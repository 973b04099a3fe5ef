"""Top-k logprob lists <-> the dense ``TopkLogprobs`` matrices of the wire.

The JSON/pydantic view is ``[[(token_id, logprob), ...] | None, ...]`` (rows may be shorter than
k; ``None`` = position not scored). On the wire it is two row-major ``length x k`` matrices with
unused cells filled by the sentinel ``(0, -99999.0)``. The SDK decodes a row whose *first* cell
is the sentinel as ``None`` and trims trailing sentinel cells; ``topk_from_message`` reproduces
exactly that, and ``topk_to_message`` is its inverse. Both scatter/gather with numpy index
arrays instead of looping over cells.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import numpy as np

from tx_types.proto import tinker_public_pb2 as pb
from tx_types.proto._arrays import FLOAT32, INT32, from_bytes
from tx_types.proto.errors import ProtoDecodeError

__all__ = ["MASK_LOGPROB", "TopkRows", "topk_from_message", "topk_to_message"]

MASK_LOGPROB = -99999.0
"""Logprob of an unused cell (token id 0), as in ``tinker.types.topk_logprobs``."""

TopkRows = list[list[tuple[int, float]] | None]


def topk_to_message(rows: Sequence[Sequence[tuple[int, float]] | None]) -> pb.TopkLogprobs:
    """Pack rows into dense matrices; k = the longest row (at least 1 so ``None`` rows survive)."""
    lengths = np.fromiter((len(r) if r else 0 for r in rows), dtype=np.int64, count=len(rows))
    n = len(rows)
    k = max(int(lengths.max(initial=0)), 1) if n else 0
    ids = np.zeros((n, k), dtype=INT32)
    lps = np.full((n, k), MASK_LOGPROB, dtype=FLOAT32)
    total = int(lengths.sum())
    if total:
        # float64 holds every int32 token id exactly, so one array carries both columns.
        pairs = np.array(list(chain.from_iterable(r for r in rows if r)), dtype=np.float64)
        if pairs.shape != (total, 2):
            raise ValueError("top-k rows must hold (token_id, logprob) pairs")
        row_idx = np.repeat(np.arange(n), lengths)
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        col_idx = np.arange(total) - starts
        ids[row_idx, col_idx] = pairs[:, 0]
        lps[row_idx, col_idx] = pairs[:, 1]
    return pb.TopkLogprobs(token_ids=ids.tobytes(), logprobs=lps.tobytes(), k=k, length=n)


def topk_from_message(msg: pb.TopkLogprobs, what: str) -> TopkRows | None:
    """Unpack dense matrices into rows exactly like the SDK (``None`` when length or k is 0)."""
    n, k = msg.length, msg.k
    if n == 0 or k == 0:
        return None
    ids = from_bytes(msg.token_ids, INT32, f"{what}.token_ids")
    lps = from_bytes(msg.logprobs, FLOAT32, f"{what}.logprobs")
    if ids.size != n * k or lps.size != n * k:
        raise ProtoDecodeError(
            f"{what}: length {n} x k {k} needs {n * k} cells, got {ids.size} ids and "
            f"{lps.size} logprobs"
        )
    ids = ids.reshape(n, k)
    lps = lps.reshape(n, k)
    real = (ids != 0) | (lps != np.float32(MASK_LOGPROB))
    # Row length = index after the last real cell; a row with no real cell gets 0.
    keep = np.where(real.any(axis=1), k - np.argmax(real[:, ::-1], axis=1), 0)
    id_rows = ids.tolist()
    lp_rows = lps.tolist()
    return [
        list(zip(id_rows[i][:m], lp_rows[i][:m], strict=True)) if real[i, 0] else None
        for i, m in enumerate(keep.tolist())
    ]
