"""The training loop behind `tx train`, and its full fine-tuning trainer.

The loop (:func:`run`) is the same for both kinds of training: it asks :mod:`tx_cli.train_data`
for the examples of each step, hands them to a :class:`Trainer`, reports the loss (progress
bar, ``metrics.jsonl``, the tracker) and checkpoints every ``save_steps`` and at the end. The
arithmetic is never here: :class:`FullTrainer` calls :func:`tx_engine.step.full_train_step`
and the LoRA trainer (:mod:`tx_cli.train_lora`) drives :class:`tx_engine.engine.TrainingEngine`
— the jitted programs of the server.

Loss: ``Σ_t -w_t · log p(target_t)`` over the batch divided by ``Σ_t w_t`` (the weighted-token
count; the batcher divides the weights, see :func:`tx_cli.train_data.collate`). That mean is
both the reported loss and the differentiated objective.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import optax
from flax import nnx

from tx_cli import train_checkpoint as ckpt
from tx_cli.loaders.base import Example, TrainInputError
from tx_cli.train_data import collate, examples_for_step
from tx_engine.step import full_train_step

# --optimizer name -> optax constructor; its keyword arguments come from --optimizer-args.
OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adamw": optax.adamw,
    "adam": optax.adam,
    "sgd": optax.sgd,
    "lion": optax.lion,
}
METRICS_FILE = "metrics.jsonl"
LOGITS_CHUNK = 2048  # tokens whose [·, V] logits exist at once (the engine's default)

Log = Callable[[dict[str, float], int], None]


@dataclass(frozen=True)
class TrainSettings:
    """Everything the loop needs besides the trainer and the examples."""

    output_dir: Path
    batch_size: int
    max_steps: int
    save_steps: int
    optimizer: str
    optimizer_args: dict[str, Any]
    seed: int = 0
    meta: dict[str, Any] = field(default_factory=dict)  # recorded in trainer_state.json


class Trainer(Protocol):
    """One kind of training: a step on a list of examples, and a checkpoint writer."""

    start_step: int

    def step(self, examples: list[Example]) -> float:
        """Train on ``examples`` (one optimizer step); return the mean loss before the step."""
        ...

    def save(self, out: Path) -> None:
        """Write the trained state (weights and optimizer state) into ``out``."""
        ...


@functools.lru_cache(maxsize=8)
def _optimizer(name: str, args_json: str) -> optax.GradientTransformation:
    return OPTIMIZERS[name](**json.loads(args_json))


def make_optimizer(name: str, args: dict[str, Any]) -> optax.GradientTransformation:
    """The optax transformation ``name(**args)``; bad names/arguments are user errors.

    Cached on the spelling: :func:`tx_engine.step.full_train_step` keys its compiled program
    on the transformation object, so a second run in one process (a resume, a test) reuses it.
    """
    if name not in OPTIMIZERS:
        raise TrainInputError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    rate = args.get("learning_rate")
    if "learning_rate" in args and (
        isinstance(rate, bool) or not isinstance(rate, int | float) or not rate >= 0
    ):  # the engine's AdamParams rule, so --lora-rank and full fine-tuning agree
        raise TrainInputError(
            f"--optimizer-args: learning_rate must be a number >= 0, got {rate!r}"
        )
    try:
        tx = _optimizer(name, json.dumps(args, sort_keys=True))
    except TypeError as e:
        raise TrainInputError(f"--optimizer-args: invalid for {name}: {e}") from e
    _probe(name, tx)
    return tx


def _probe(name: str, tx: optax.GradientTransformation) -> None:
    """One update of a scalar parameter, so that a wrong argument *value* (a list for ``b1``)
    fails now as a usage error: optax only uses the values inside the first jitted step,
    which crashed with a JAX traceback after the model had loaded."""
    import jax.numpy as jnp

    try:
        param = jnp.zeros(())
        tx.update(param, tx.init(param), param)
    except Exception as e:
        raise TrainInputError(
            f"--optimizer-args: invalid for {name}: {type(e).__name__}: {e}"
        ) from e


class FullTrainer:
    """Full fine-tuning: every base ``nnx.Param`` of ``model`` is trained by optax."""

    def __init__(self, model: Any, settings: TrainSettings, resume_from: Path | None) -> None:
        self.tx = make_optimizer(settings.optimizer, settings.optimizer_args)
        parts: Any = nnx.split(model, nnx.Param, ...)  # LoRA factors are not nnx.Param
        self.graphdef, self.params, self.rest = parts
        self.opt_state = self.tx.init(self.params)
        self.start_step = 0
        if resume_from is not None:
            self.start_step = ckpt.read_step(resume_from)
            with ckpt.reading("--load-checkpoint-path", resume_from):
                self.opt_state = ckpt.load_opt_state(resume_from, self.opt_state)

    def step(self, examples: list[Example]) -> float:
        self.params, self.opt_state, loss = full_train_step(
            self.graphdef,
            self.params,
            self.rest,
            self.opt_state,
            collate(examples),
            tx=self.tx,
            logits_chunk=LOGITS_CHUNK,
        )
        return float(loss)

    def save(self, out: Path) -> None:
        model = nnx.merge(self.graphdef, self.params, self.rest)
        ckpt.save_full(out, model, self.opt_state)


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


def run(
    trainer: Trainer,
    examples: list[Example],
    tokenizer: Any,
    settings: TrainSettings,
    log: Log | None = None,
) -> list[float]:
    """Run steps ``start+1 … max_steps``; returns their losses (also in ``metrics.jsonl``)."""
    if not examples:
        raise TrainInputError("the dataset produced no training examples")
    start = trainer.start_step
    if start >= settings.max_steps:
        raise TrainInputError(
            f"--max-steps {settings.max_steps}: the checkpoint is already at step {start}"
        )
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    _keep_metrics_until(settings.output_dir / METRICS_FILE, start)
    ckpt.remove_partial(settings.output_dir)
    losses: list[float] = []
    with _progress() as bar, open(settings.output_dir / METRICS_FILE, "a") as metrics:
        task = bar.add_task("train", total=settings.max_steps, completed=start, loss=0.0, tps=0)
        for step in range(start, settings.max_steps):
            t0 = time.perf_counter()
            batch = examples_for_step(examples, settings.batch_size, step, settings.seed)
            loss = trainer.step(batch)  # a host float: the timing covers the whole step
            tokens = sum(len(e) for e in batch)
            tps = tokens / max(time.perf_counter() - t0, 1e-9)
            record = {"step": step + 1, "loss": loss, "tokens": tokens, "tokens_per_s": tps}
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            if log is not None:
                log({"loss": loss, "tokens": float(tokens), "tokens_per_s": tps}, step + 1)
            losses.append(loss)
            bar.update(task, advance=1, loss=loss, tps=tps)
            done = step + 1
            if done % settings.save_steps == 0 or done == settings.max_steps:
                _save(trainer, tokenizer, settings, done)
    return losses


def _save(trainer: Trainer, tokenizer: Any, settings: TrainSettings, step: int) -> None:
    """Write ``checkpoint-<step>`` into a staging directory, then move it in place whole."""
    staging = ckpt.staging_dir(settings.output_dir, step)
    trainer.save(staging)
    meta = {"optimizer": settings.optimizer, "optimizer_args": settings.optimizer_args}
    ckpt.write_state(staging, step, tokenizer, {**meta, **settings.meta})
    ckpt.commit(staging, ckpt.checkpoint_dir(settings.output_dir, step))


def _keep_metrics_until(path: Path, start: int) -> None:
    """Drop the records of ``path`` after step ``start`` (all of them for a fresh run).

    Why: the file is appended to, so a rerun in the same ``--output-dir`` logged steps
    1..N twice, and a resume from step k kept the interrupted run's records after k beside
    the new ones. After this the file is the history that led to the latest checkpoints.
    """
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            continue  # a line cut by an interrupt
        if isinstance(step, int) and step <= start:
            kept.append(line + "\n")
    path.write_text("".join(kept))
