"""What every loader produces, and the one error type of `tx train`'s input checks.

A loader turns dataset rows into :class:`Example`\\ s already in Tinker's alignment: position
``i`` of ``input_tokens`` predicts ``target_tokens[i]`` (the sequence shifted by one), and
``weights[i]`` scales that prediction's cross-entropy. Examples are unpadded; the batcher
(:mod:`tx_cli.train_data`) pads them with weight 0, so padding can never carry loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


class TrainInputError(ValueError):
    """A user-supplied input of `tx train` is wrong; the CLI prints it as one line, exit 2."""


@dataclass(frozen=True)
class Example:
    """One training sequence: int32 ``input_tokens``/``target_tokens`` and float32 ``weights``."""

    input_tokens: np.ndarray
    target_tokens: np.ndarray
    weights: np.ndarray

    def __len__(self) -> int:
        return int(self.input_tokens.shape[0])


# fn(dataset, tokenizer, max_length) -> examples
Loader = Callable[[Any, Any, int], list[Example]]


def shifted_example(tokens: Sequence[int], token_weights: Sequence[float]) -> Example | None:
    """``tokens[:-1]`` predicts ``tokens[1:]``; the weight of a prediction is its target's.

    Returns ``None`` for sequences too short to predict anything or with no weighted target,
    so they never contribute an empty row to a batch.
    """
    if len(tokens) < 2:
        return None
    toks = np.asarray(tokens, np.int32)
    w = np.asarray(token_weights, np.float32)[1:]
    if not (w > 0).any():
        return None
    return Example(toks[:-1], toks[1:], w)


def require_column(dataset: Any, column: str) -> None:
    """Fail with the dataset's real columns when the loader's column is missing."""
    names = list(getattr(dataset, "column_names", None) or [])
    if column not in names:
        raise TrainInputError(f"dataset has no column {column!r} (columns: {', '.join(names)})")
