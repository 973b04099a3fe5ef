"""The full fine-tuning loop behind `tx train`.

Why a jitted step lives here and not in :mod:`tx_engine.step`: the engine's programs train
LoRA slots only (the server's multi-tenant path), while `tx train` fine-tunes every base
``nnx.Param``. The step below reuses the engine's pieces — the model classes, the loader
(:func:`tx_engine.loading.load_model`), the target log-prob gather and the ``cross_entropy``
kernel of :mod:`tx_engine.losses` — so the numerics are the server's; move it into
``tx_engine.step`` once the engine grows a full-fine-tuning program.

Loss: ``Σ_t -w_t · log p(target_t)`` over the batch divided by ``Σ_t w_t`` (the weighted-token
count). That mean is both the reported loss and the differentiated objective, so the update
size does not depend on how many tokens a batch happens to hold.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tx_cli import train_checkpoint as ckpt
from tx_cli.loaders.base import Example, TrainInputError
from tx_cli.train_data import batch_for_step

# --optimizer name -> optax constructor; its keyword arguments come from --optimizer-args.
OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adamw": optax.adamw,
    "adam": optax.adam,
    "sgd": optax.sgd,
    "lion": optax.lion,
}
METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class TrainSettings:
    """Everything the loop needs besides the model and the examples."""

    output_dir: Path
    batch_size: int
    max_steps: int
    save_steps: int
    optimizer: str
    optimizer_args: dict[str, Any]
    seed: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


def make_optimizer(name: str, args: dict[str, Any]) -> optax.GradientTransformation:
    """The optax transformation ``name(**args)``; bad names/arguments are user errors."""
    if name not in OPTIMIZERS:
        raise TrainInputError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    try:
        return OPTIMIZERS[name](**args)
    except TypeError as e:
        raise TrainInputError(f"--optimizer-args: invalid for {name}: {e}") from e


def mean_cross_entropy(
    graphdef: nnx.GraphDef[Any], params: Any, rest: Any, batch: dict[str, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    """Weighted mean token cross-entropy of ``batch`` and the weighted-token count."""
    from tx_engine import losses

    model: Any = nnx.merge(graphdef, params, rest)
    adapters_b = jnp.zeros(batch["input_ids"].shape[:1], jnp.int32)  # slot 0: no LoRA
    hidden_btd = model(
        batch["input_ids"],
        positions_bt=batch["positions"],
        attention_mask_bt=batch["attention_mask"],
        adapter_indices_b=adapters_b,
    )
    logprobs_bt = losses.target_logprobs_from_logits(
        model.compute_logits(hidden_btd, adapters_b), batch["target_tokens"]
    )
    total, _ = losses.compute_loss(
        losses.get_loss_fn("cross_entropy"),
        logprobs_bt,
        {"weights": batch["weights"]},
        batch["attention_mask"],
        {},
    )
    count = batch["weights"].sum()
    return total / jnp.maximum(count, 1e-9), count


@functools.lru_cache(maxsize=8)
def make_train_step(graphdef: nnx.GraphDef[Any], optimizer: str, args_json: str) -> Any:
    """``step(params, rest, opt_state, batch) -> (params, opt_state, loss, count)``, jitted.

    ``params`` and ``opt_state`` are donated: each step replaces them, so their buffers are
    reused instead of doubling the memory of a full fine-tune. Cached on the model structure
    and the optimizer spelling, so a second run in one process (a resume, a test) reuses the
    compiled program instead of tracing a fresh closure.
    """
    tx = make_optimizer(optimizer, json.loads(args_json))

    def step(params: Any, rest: Any, opt_state: Any, batch: Any) -> Any:
        grad_fn = jax.value_and_grad(
            lambda p: mean_cross_entropy(graphdef, p, rest, batch), has_aux=True
        )
        (loss, count), grads = grad_fn(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, count

    return jax.jit(step, donate_argnums=(0, 2))


def _progress() -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeRemainingColumn(),
    )


def train(
    model: Any,
    examples: list[Example],
    tokenizer: Any,
    settings: TrainSettings,
    resume_from: Path | None = None,
    log: Callable[[dict[str, float], int], None] | None = None,
) -> list[float]:
    """Run steps ``start+1 … max_steps``; returns their losses (also in ``metrics.jsonl``)."""
    if not examples:
        raise TrainInputError("the dataset produced no training examples")
    tx = make_optimizer(settings.optimizer, settings.optimizer_args)
    parts: Any = nnx.split(model, nnx.Param, ...)  # trainable = every base nnx.Param
    graphdef, params, rest = parts
    opt_state = tx.init(params)
    start = 0
    if resume_from is not None:
        start = ckpt.read_step(resume_from)
        opt_state = ckpt.load_opt_state(resume_from, opt_state)
        if start >= settings.max_steps:
            raise TrainInputError(
                f"--max-steps {settings.max_steps}: the checkpoint is already at step {start}"
            )
    args_json = json.dumps(settings.optimizer_args, sort_keys=True)
    step_fn = make_train_step(graphdef, settings.optimizer, args_json)
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    losses: list[float] = []
    with _progress() as bar, open(settings.output_dir / METRICS_FILE, "a") as metrics:
        task = bar.add_task("train", total=settings.max_steps, completed=start, loss=0.0, tps=0)
        for step in range(start, settings.max_steps):
            t0 = time.perf_counter()
            batch = batch_for_step(examples, settings.batch_size, step, settings.seed)
            params, opt_state, loss, _ = step_fn(params, rest, opt_state, batch)
            loss_f = float(loss)  # blocks: the timing below covers the whole step
            tokens = int(np.asarray(batch["attention_mask"]).sum())
            tps = tokens / max(time.perf_counter() - t0, 1e-9)
            record = {"step": step + 1, "loss": loss_f, "tokens": tokens, "tokens_per_s": tps}
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            if log is not None:
                log({"loss": loss_f, "tokens_per_s": tps}, step + 1)
            losses.append(loss_f)
            bar.update(task, advance=1, loss=loss_f, tps=tps)
            done = step + 1
            if done % settings.save_steps == 0 or done == settings.max_steps:
                _save(graphdef, params, rest, opt_state, done, tokenizer, settings)
    return losses


def _save(
    graphdef: Any, params: Any, rest: Any, opt_state: Any, step: int, tok: Any, s: TrainSettings
) -> None:
    meta = {"optimizer": s.optimizer, "optimizer_args": s.optimizer_args, **s.meta}
    model = nnx.merge(graphdef, params, rest)
    ckpt.save_checkpoint(ckpt.checkpoint_dir(s.output_dir, step), model, opt_state, step, tok, meta)
