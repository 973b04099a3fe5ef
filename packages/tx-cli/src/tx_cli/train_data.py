"""Datasets in, fixed-shape padded batches out, in an order that depends only on the step.

`open_dataset` accepts a Hugging Face dataset id or a local file/directory (jsonl, json,
parquet, csv, arrow, or a ``save_to_disk`` directory) and turns every way of naming a
missing thing into one :class:`TrainInputError` line.

`batch_for_step` is a pure function of ``(examples, step)``: epoch ``e`` visits the examples
in the permutation drawn from ``seed + e``, and step ``s`` takes positions ``s·B … s·B+B-1``
of that endless sequence. Resuming at step ``k`` therefore needs no saved data-loader state
and sees exactly the batches an uninterrupted run would. Rows are right-padded to a
power-of-two length bucket (at least :data:`MIN_BUCKET`) so a run compiles only a handful of
programs; padded cells get weight 0 and attention mask 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tx_cli.loaders.base import Example, TrainInputError

MIN_BUCKET = 32
_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
}


def _looks_local(name: str) -> bool:
    return (
        Path(name).suffix.lower() in _BUILDERS
        or name.startswith((".", "/", "~"))
        or Path(name).expanduser().exists()
    )


def _load_local(path: Path) -> Any:
    import datasets

    if not path.exists():
        raise TrainInputError(f"dataset file not found: {path}")
    saved = ("dataset_dict.json", "state.json")
    if path.is_dir() and any((path / f).exists() for f in saved):
        return datasets.load_from_disk(str(path))
    if path.is_dir():
        return datasets.load_dataset(str(path))
    if path.stat().st_size == 0:  # else the json builder fails with a bare StopIteration
        raise TrainInputError(f"dataset file {path} is empty")
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise TrainInputError(
            f"dataset file {path} has an unsupported extension; use one of {', '.join(_BUILDERS)}"
        )
    return datasets.load_dataset(builder, data_files={"train": str(path)})


def open_dataset(name: str, split: str) -> Any:
    """The ``split`` of dataset ``name`` (HF id or local path) as a ``datasets.Dataset``."""
    import datasets

    datasets.disable_progress_bars()  # our own progress bar is the one that matters
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors reach us raised
    try:
        if _looks_local(name):
            loaded = _load_local(Path(name).expanduser())
        else:
            loaded = datasets.load_dataset(name)
    except TrainInputError:
        raise
    except FileNotFoundError as e:
        raise TrainInputError(f"dataset {name!r} not found: {e}") from e
    except Exception as e:  # the datasets library raises many types for a bad id/file
        raise TrainInputError(f"cannot load dataset {name!r}: {_reason(e)}") from e
    finally:
        datasets.logging.set_verbosity(verbosity)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    if split not in loaded:
        raise TrainInputError(
            f"unknown split {split!r} for dataset {name!r}; available: {', '.join(loaded)}"
        )
    return loaded[split]


def _reason(e: BaseException) -> str:
    """``e`` and, when it wraps another error, the innermost one: ``DatasetGenerationError``
    only says "An error occurred while generating the dataset"; the parse error that names the
    bad row is its cause (which ``datasets`` otherwise logs as a separate stderr line)."""
    root = e
    for _ in range(16):  # a bound, not a cycle check: chains are short
        # explicit causes first: an implicit context can be a later fallback's failure
        inner = root.__cause__ or (root.__context__ if root is e else None)
        if inner is None:
            break
        root = inner
    text = f"{type(e).__name__}: {e}"
    return text if root is e else f"{text} ({type(root).__name__}: {root})"


def bucket_length(n: int) -> int:
    """The smallest power of two ≥ ``n`` and ≥ :data:`MIN_BUCKET`."""
    return max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())


def example_order(num_examples: int, epoch: int, seed: int) -> np.ndarray:
    """The permutation of example indices visited in ``epoch``."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of 0-based ``step``; a batch may straddle two epochs."""
    orders: dict[int, np.ndarray] = {}
    out: list[int] = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, num_examples)
        if epoch not in orders:
            orders[epoch] = example_order(num_examples, epoch, seed)
        out.append(int(orders[epoch][i]))
    return out


def collate(examples: list[Example]) -> dict[str, Any]:
    """Right-pad ``examples`` into the batch dict of :mod:`tx_engine.step` (``[B, T]`` arrays).

    The keys are those of :func:`tx_engine.batching.pack`, so the full fine-tuning step runs
    the server's loss code unchanged. Weights are divided by the batch's total weight: the
    engine's ``cross_entropy`` is a weighted *sum*, and this turns it into the per-token mean,
    so the update size does not depend on how many tokens a batch happens to hold. Padding has
    weight 0, attention mask 0 and loss mask 0.
    """
    b, t = len(examples), bucket_length(max(len(e) for e in examples))
    ids = np.zeros((b, t), np.int32)
    targets = np.zeros((b, t), np.int32)
    weights = np.zeros((b, t), np.float32)
    mask = np.zeros((b, t), np.float32)
    for r, ex in enumerate(examples):
        n = len(ex)
        ids[r, :n] = ex.input_tokens
        targets[r, :n] = ex.target_tokens
        weights[r, :n] = ex.weights
        mask[r, :n] = 1.0
    return {
        "input_ids": ids,
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
        "attention_mask": mask.astype(np.int32),
        "adapter_indices": np.zeros((b,), np.int32),  # slot 0: the base model, no LoRA
        "loss_mask": mask,
        "target_tokens": targets,
        "inputs": {"weights": weights / batch_weight(examples)},
        "config": {},
    }


def batch_weight(examples: list[Example]) -> float:
    """Total weight of a batch (> 0: loaders drop examples without a weighted target)."""
    return float(sum(float(e.weights.sum()) for e in examples))


def examples_for_step(
    examples: list[Example], batch_size: int, step: int, seed: int = 0
) -> list[Example]:
    """The examples of 0-based ``step`` (deterministic in ``step`` and ``seed``)."""
    return [examples[i] for i in batch_indices(len(examples), batch_size, step, seed)]


def batch_for_step(
    examples: list[Example], batch_size: int, step: int, seed: int = 0
) -> dict[str, Any]:
    """The padded batch of 0-based ``step`` (deterministic in ``step`` and ``seed``)."""
    return collate(examples_for_step(examples, batch_size, step, seed))
