"""`tx train` checkpoints: a loadable HF model directory plus the optimizer state.

Layout of ``<output-dir>/checkpoint-<step>/``:

* full fine-tuning: ``config.json`` + ``model.safetensors`` under HF key names (written by
  :func:`tx_engine.loading.save_hf_weights`, so :func:`tx_engine.loading.load_model` and
  ``transformers`` both read it) and ``optimizer.safetensors``, every leaf of the optax state
  keyed by its pytree path;
* LoRA (``--lora-rank``): the engine's adapter checkpoint (``adapter.safetensors``,
  ``optimizer.safetensors``, ``metadata.json``; :meth:`TrainingEngine.save_adapter`) and its
  PEFT export (``adapter_config.json`` + ``adapter_model.safetensors``), side by side, so the
  directory is both resumable and loadable by ``peft``/vLLM as is;
* always: the tokenizer files and ``trainer_state.json`` — the number of optimizer steps
  taken, which is all the data order needs (:mod:`tx_cli.train_data` derives batches from
  the step), the run's options and ``lora_rank`` (null for a full fine-tune).

A checkpoint is written into ``.checkpoint-<step>.partial`` and renamed when complete
(:func:`commit`), so ``checkpoint-<step>`` is never half written nor mixed with an earlier
run's files.

Weights are stored at their training precision (float32), so resuming reproduces an
uninterrupted run bit for bit.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tx_cli.loaders.base import TrainInputError

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
PARTIAL_SUFFIX = ".partial"  # a checkpoint being written: .checkpoint-<step>.partial


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / f"checkpoint-{step}"


def save_full(out: Path, model: Any, opt_state: Any) -> Path:
    """Write a full fine-tune's weights (HF layout) and its optax state into ``out``."""
    from tx_engine.loading import save_hf_weights
    from tx_engine.safetensors_io import write_file

    save_hf_weights(model, out)
    leaves = jax.tree_util.tree_flatten_with_path(opt_state)[0]
    write_file(
        out / OPTIMIZER_FILE,
        {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves},
    )
    return out


def write_state(out: Path, step: int, tokenizer: Any, meta: dict[str, Any]) -> None:
    """The tokenizer files and ``trainer_state.json`` = ``{"step": step, **meta}``."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    (out / STATE_FILE).write_text(json.dumps({"step": step, **meta}, indent=2) + "\n")


def read_state(ckpt: Path) -> dict[str, Any]:
    """``trainer_state.json`` of ``ckpt`` as a dict with a valid ``step``.

    Why: the file is the user's (copied, edited, truncated); anything else than a JSON object
    with a non-negative integer ``step`` and an integer-or-null ``lora_rank`` must end in one
    line naming the file, not a ``JSONDecodeError`` or ``AttributeError`` traceback.
    """
    state_file = ckpt / STATE_FILE
    if not state_file.is_file():
        raise TrainInputError(f"--load-checkpoint-path: {ckpt} has no {STATE_FILE}")
    try:
        state = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrainInputError(
            f"--load-checkpoint-path: {state_file} is not valid JSON ({e})"
        ) from e
    if not isinstance(state, dict):
        raise TrainInputError(f"--load-checkpoint-path: {state_file} is not a JSON object")
    step, rank = state.get("step"), state.get("lora_rank")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise TrainInputError(f"--load-checkpoint-path: {state_file} has no valid 'step'")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
        raise TrainInputError(f"--load-checkpoint-path: {state_file} has an invalid 'lora_rank'")
    return state


def check_kind(ckpt: Path, lora_rank: int | None, optimizer: str | None = None) -> None:
    """Refuse to resume a LoRA checkpoint as a full fine-tune, or with another rank, or (when
    ``optimizer`` is given) a state written by another ``--optimizer``: its optax state would
    not match, and naming the two optimizers beats listing the mismatched pytree paths."""
    state = read_state(ckpt)
    saved = state.get("lora_rank")
    if saved != lora_rank:
        if saved is None:
            raise TrainInputError(
                f"--lora-rank {lora_rank}: {ckpt} is a full fine-tuning checkpoint; "
                "resume it without --lora-rank"
            )
        given = "not given" if lora_rank is None else f"{lora_rank}"
        raise TrainInputError(
            f"--lora-rank: {ckpt} is a rank-{saved} LoRA checkpoint; pass --lora-rank {saved} "
            f"(got {given})"
        )
    trained_with = state.get("optimizer")
    if optimizer is not None and isinstance(trained_with, str) and trained_with != optimizer:
        raise TrainInputError(
            f"--optimizer {optimizer}: {ckpt} was trained with --optimizer {trained_with}; "
            "its optimizer state cannot be resumed by another optimizer"
        )


def read_step(ckpt: Path) -> int:
    """The step recorded in a checkpoint; fails naming the path if it is not one of ours."""
    step: int = read_state(ckpt)["step"]
    return step


@contextmanager
def reading(option: str, path: Path) -> Iterator[None]:
    """Turn a failure to read the files of ``path`` into one line naming ``option``.

    Why: the safetensors readers raise whatever a damaged file triggers (a ``SafetensorError``
    from the library, an ``OSError``); for the user all of them mean "this file is damaged",
    and a traceback hides which one. The engine's own user errors (a ``CheckpointError`` that
    names the truncated file or the mismatched keys) keep their message, prefixed with the
    option; our own input errors pass through unchanged.
    """
    try:
        yield
    except TrainInputError:
        raise
    except Exception as e:
        if getattr(e, "category", None) == "user":
            raise TrainInputError(f"{option}: {e}") from e
        raise TrainInputError(f"{option}: cannot read {path}: {type(e).__name__}: {e}") from e


def commit(staging: Path, out: Path) -> None:
    """Move a fully written checkpoint from ``staging`` to ``out``, replacing ``out`` whole.

    Why: writing file by file into ``out`` mixed a rerun's files with the stale ones of an
    earlier run in the same ``--output-dir`` (a LoRA adapter beside an old full model, which
    ``from_pretrained`` would load), and an interrupt mid-save left a half checkpoint under the
    final name. Now ``checkpoint-N`` only ever appears complete.
    """
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)


def staging_dir(output_dir: Path, step: int) -> Path:
    """An empty hidden directory beside ``checkpoint-<step>`` to write that checkpoint into."""
    staging = output_dir / f".checkpoint-{step}{PARTIAL_SUFFIX}"
    if staging.exists():
        shutil.rmtree(staging)
    return staging


def remove_partial(output_dir: Path) -> None:
    """Delete the staging directories that interrupted saves left in ``output_dir``."""
    for staging in output_dir.glob(f".checkpoint-*{PARTIAL_SUFFIX}"):
        shutil.rmtree(staging, ignore_errors=True)


def load_opt_state(ckpt: Path, template: Any) -> Any:
    """``template`` (a freshly initialised optax state) with every leaf read from ``ckpt``."""
    from tx_engine.safetensors_io import iter_tensors

    path = ckpt / OPTIMIZER_FILE
    if not path.is_file():
        raise TrainInputError(f"--load-checkpoint-path: {ckpt} has no {OPTIMIZER_FILE}")
    stored = dict(iter_tensors(path))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    keys = [jax.tree_util.keystr(p) for p, _ in leaves]
    missing = sorted(set(keys) - stored.keys())
    unexpected = sorted(stored.keys() - set(keys))
    if missing or unexpected:
        raise TrainInputError(
            f"--load-checkpoint-path: optimizer state does not match --optimizer "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    filled = []
    for key, (_, leaf) in zip(keys, leaves, strict=True):
        value = np.asarray(stored[key])
        if value.shape != leaf.shape:
            raise TrainInputError(f"--load-checkpoint-path: {key} has shape {value.shape}")
        arr = jnp.asarray(value, leaf.dtype)
        sharding = getattr(leaf, "sharding", None)
        filled.append(jax.device_put(arr, sharding) if sharding is not None else arr)
    return jax.tree_util.tree_unflatten(treedef, filled)
