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

Weights are stored at their training precision (float32), so resuming reproduces an
uninterrupted run bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tx_cli.loaders.base import TrainInputError

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"


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


def check_kind(ckpt: Path, lora_rank: int | None) -> None:
    """Refuse to resume a LoRA checkpoint as a full fine-tune, or with another rank."""
    state_file = ckpt / STATE_FILE
    if not state_file.is_file():
        raise TrainInputError(f"--load-checkpoint-path: {ckpt} has no {STATE_FILE}")
    saved = json.loads(state_file.read_text()).get("lora_rank")
    if saved == lora_rank:
        return
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


def read_step(ckpt: Path) -> int:
    """The step recorded in a checkpoint; fails naming the path if it is not one of ours."""
    state_file = ckpt / STATE_FILE
    if not state_file.is_file():
        raise TrainInputError(f"--load-checkpoint-path: {ckpt} has no {STATE_FILE}")
    step = json.loads(state_file.read_text()).get("step")
    if not isinstance(step, int) or step < 0:
        raise TrainInputError(f"--load-checkpoint-path: {state_file} has no valid 'step'")
    return step


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
