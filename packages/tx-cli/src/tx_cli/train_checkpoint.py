"""`tx train` checkpoints: a loadable HF model directory plus the optimizer state.

Layout of ``<output-dir>/checkpoint-<step>/``:

* ``config.json`` + ``model.safetensors`` under HF key names (written by
  :func:`tx_engine.loading.save_hf_weights`, so :func:`tx_engine.loading.load_model` and
  ``transformers`` both read it) and the tokenizer files — a complete model to serve or sample;
* ``optimizer.safetensors`` — every leaf of the optax state, keyed by its pytree path;
* ``trainer_state.json`` — the number of optimizer steps taken, which is all the data order
  needs (:mod:`tx_cli.train_data` derives batches from the step).

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


def save_checkpoint(
    out: Path, model: Any, opt_state: Any, step: int, tokenizer: Any, meta: dict[str, Any]
) -> Path:
    """Write model, tokenizer, optimizer state and ``{"step": step, **meta}`` into ``out``."""
    from tx_engine.loading import save_hf_weights
    from tx_engine.safetensors_io import write_file

    save_hf_weights(model, out)
    tokenizer.save_pretrained(str(out))
    leaves = jax.tree_util.tree_flatten_with_path(opt_state)[0]
    write_file(
        out / OPTIMIZER_FILE,
        {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves},
    )
    (out / STATE_FILE).write_text(json.dumps({"step": step, **meta}, indent=2) + "\n")
    return out


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
