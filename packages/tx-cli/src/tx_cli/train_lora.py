"""LoRA fine-tuning for `tx train --lora-rank R`, on the server's own engine.

:class:`LoraTrainer` drives a one-adapter :class:`tx_engine.engine.TrainingEngine`:
``create_adapter`` (or ``load_adapter`` to resume), then per step ``forward_backward`` +
``optim_step`` — the jitted programs a Tinker client's requests run, so a LoRA trained here
and one trained through the server follow the same arithmetic.

Optimizer: the engine's AdamW (torch semantics, :mod:`tx_engine.optim`), which is the algebra
of ``optax.adamw``. ``--optimizer-args`` keeps optax's spelling and optax's defaults
(``b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4``) so the same JSON means the same run in
both modes; ``grad_clip_norm`` is accepted in addition. Only ``--optimizer adamw`` is valid.

Loss: each example's weights are divided by the batch's total weight, so the engine's summed
``cross_entropy`` is the per-token mean — the objective of full fine-tuning too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tx_cli import train_checkpoint as ckpt
from tx_cli.loaders.base import Example, TrainInputError
from tx_cli.train_data import batch_weight
from tx_cli.train_loop import TrainSettings

# optax.adamw keyword -> tx_engine AdamParams field
ADAMW_ARGS = {
    "learning_rate": "learning_rate",
    "b1": "beta1",
    "b2": "beta2",
    "eps": "eps",
    "weight_decay": "weight_decay",
    "grad_clip_norm": "grad_clip_norm",
}
OPTAX_ADAMW_DEFAULTS = {"b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 1e-4}


def adam_params(optimizer: str, args: dict[str, Any]) -> Any:
    """The engine's ``AdamParams`` for ``--optimizer``/``--optimizer-args`` in optax spelling."""
    from tx_engine.engine import AdamParams
    from tx_engine.errors import InputError

    if optimizer != "adamw":
        raise TrainInputError(
            f"--optimizer: LoRA training (--lora-rank) uses the engine's AdamW; "
            f"use adamw, got {optimizer!r}"
        )
    unknown = sorted(set(args) - set(ADAMW_ARGS))
    if unknown:
        raise TrainInputError(
            f"--optimizer-args: {', '.join(unknown)} not supported with --lora-rank "
            f"(accepted: {', '.join(ADAMW_ARGS)})"
        )
    if "learning_rate" not in args:
        raise TrainInputError("--optimizer-args: learning_rate is required")
    values = {**OPTAX_ADAMW_DEFAULTS, **args}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TrainInputError(f"--optimizer-args: {key} must be a number, got {value!r}")
    try:
        return AdamParams(**{ADAMW_ARGS[k]: float(v) for k, v in values.items()})
    except InputError as e:
        raise TrainInputError(f"--optimizer-args: {e}") from e


class LoraTrainer:
    """A rank-``rank`` LoRA adapter on the base model in ``model_dir``, trained by the engine."""

    def __init__(
        self,
        model_dir: Path,
        rank: int,
        settings: TrainSettings,
        resume_from: Path | None,
        tp_size: int = 1,
    ) -> None:
        from tx_engine.config import EngineConfig
        from tx_engine.engine import TrainingEngine

        self.adam = adam_params(settings.optimizer, settings.optimizer_args)
        config = EngineConfig(max_lora_adapters=1, max_lora_rank=rank, mesh_tp=tp_size)
        with ckpt.reading("--model", model_dir):  # --tp-size was checked by the caller
            self.engine = TrainingEngine(model_dir, config)
        # PEFT's base_model_name_or_path: the hub id, or the local directory as absolute path
        self.base_name = str(settings.meta.get("model") or model_dir)
        self.start_step = 0
        if resume_from is None:
            self.slot = self.engine.create_adapter(rank, seed=settings.seed)
        else:
            self.start_step = ckpt.read_step(resume_from)
            with ckpt.reading("--load-checkpoint-path", resume_from):
                self.slot = self.engine.load_adapter(resume_from, with_optimizer=True)

    def step(self, examples: list[Example]) -> float:
        from tx_engine.engine import AdapterBatch, DatumArrays

        total = batch_weight(examples)
        data = [
            DatumArrays(
                e.input_tokens, {"target_tokens": e.target_tokens, "weights": e.weights / total}
            )
            for e in examples
        ]
        (out,) = self.engine.forward_backward([AdapterBatch(self.slot, data, "cross_entropy")])
        self.engine.optim_step(self.slot, self.adam)
        return float(out.metrics["loss:sum"])

    def save(self, out: Path) -> None:
        self.engine.save_adapter(self.slot, out, include_optimizer=True)
        self.engine.export_peft(self.slot, out, base_model_name=self.base_name)
