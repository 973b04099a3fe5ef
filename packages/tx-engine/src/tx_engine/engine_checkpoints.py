"""Checkpoint glue of :class:`~tx_engine.engine.TrainingEngine`: save, load and export adapters.

A mixin so that the engine module keeps to the training loop and slot bookkeeping, while the
public methods (``save_adapter``, ``load_adapter``, ``export_peft``, ...) stay on the engine
itself. The file formats live in :mod:`tx_engine.checkpoint`; this is only the part that knows
the engine's state layout (slot axis, full-rank padding, declared shardings).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tx_engine import checkpoint, optim, step
from tx_engine.checkpoint import LoraConfig
from tx_engine.config import EngineConfig
from tx_engine.errors import AdapterError, CheckpointError
from tx_engine.loading import save_hf_weights
from tx_engine.step.flat_state import Held, unflatten_states


class AdapterCheckpoints:
    """Checkpoint methods of :class:`~tx_engine.engine.TrainingEngine` (mixed into it)."""

    # Engine state these methods read and replace; TrainingEngine defines all of it.
    config: EngineConfig
    model_dir: Path
    _lora: step.State
    _opt: optim.OptState
    _held_lora: Held
    _held_opt: Held
    _adapters: dict[int, LoraConfig]
    _groups: dict[str, str]

    if TYPE_CHECKING:

        @property
        def num_slots(self) -> int: ...

        def _claim_slot(
            self,
            rank: int,
            alpha: float | None,
            seed: int | None,
            train_attn: bool,
            train_mlp: bool,
            train_unembed: bool,
        ) -> tuple[int, LoraConfig]: ...

        def _install_slot(
            self,
            slot: int,
            cfg: LoraConfig,
            factors: tuple[np.ndarray, ...],
            moments: tuple[np.ndarray, ...] | None,
            step: int,
        ) -> None: ...

        def _require(self, slot: int) -> None: ...

        def _model(self) -> nnx.Module: ...

        def _pin_state(self) -> None: ...

        def _weights_changed(self, slots: Iterable[int]) -> None: ...

    def save_adapter(self, slot: int, path: str | Path, include_optimizer: bool = True) -> None:
        """Write ``slot``'s weights (and moments) as a rank-trimmed, slot-independent checkpoint."""
        checkpoint.save_adapter(path, self.adapter_state(slot, include_optimizer))

    def adapter_state(self, slot: int, include_optimizer: bool = True) -> checkpoint.AdapterState:
        """``slot``'s weights (and moments) as host arrays: what :meth:`save_adapter` writes."""
        return self.adapter_state_later(slot, include_optimizer)()

    def adapter_state_later(
        self, slot: int, include_optimizer: bool = True
    ) -> Callable[[], checkpoint.AdapterState]:
        """Cut ``slot`` out of the state now; the returned function copies it to the host.

        The cut is one dispatched device computation per tree whose outputs are new buffers, so
        the engine may run its next steps (which donate the full state) before the copy: the
        server's recovery snapshots copy and write in a background thread, off the step's path.
        """
        self._require(slot)
        cfg = self._adapters[slot]
        # The flat sides, kept flat until the host copy: a recovery snapshot follows every
        # optimizer step, and building the states here would put that work on the step's path.
        lora, opt = self._held_lora.flat, self._held_opt.flat
        trees = (lora, opt.count) + ((opt.m, opt.v) if include_optimizer else ())
        cut = step.take_slot.flat(trees, jnp.int32(slot))  # one dispatch for everything

        def to_host() -> checkpoint.AdapterState:
            weights, count, *moments = unflatten_states(jax.device_get(cut))
            host_moments = None
            if moments:
                host_moments = {
                    f"{k}/{n}": a
                    for k, tree in zip(("m", "v"), moments, strict=True)
                    for n, a in checkpoint.trimmed(tree, cfg.rank).items()
                }
            factors = checkpoint.trimmed(weights, cfg.rank)
            return checkpoint.AdapterState(cfg, factors, host_moments, int(count))

        return to_host

    def load_adapter(
        self, path: str | Path, slot: int | None = None, with_optimizer: bool = True
    ) -> int:
        """Load a checkpoint into ``slot`` (a fresh one if None); return the slot.

        Without optimizer state the moments and step count start from zero. Pending gradients
        of the slot are dropped: they belonged to the weights being replaced.
        """
        state = checkpoint.load_adapter(path, with_optimizer=with_optimizer)
        cfg = state.lora_config
        if cfg.rank > self.config.max_lora_rank:
            raise AdapterError(
                f"checkpoint rank {cfg.rank} exceeds max_lora_rank {self.config.max_lora_rank}"
            )
        checkpoint.check_fits(self._lora, state.factors, "adapter weights", cfg.rank)
        moments = None
        if state.moments is not None:
            moments = _split_moments(state.moments)
            checkpoint.check_fits(self._opt.m, moments[0], "optimizer m", cfg.rank)
            checkpoint.check_fits(self._opt.v, moments[1], "optimizer v", cfg.rank)
        factors = checkpoint.slot_values(self._lora, state.factors)
        moment_values = None
        if moments is not None:
            moment_values = (
                *checkpoint.slot_values(self._opt.m, moments[0]),
                *checkpoint.slot_values(self._opt.v, moments[1]),
            )
        if slot is None:
            slot, cfg = self._claim_slot(
                cfg.rank, cfg.alpha, cfg.seed, cfg.train_attn, cfg.train_mlp, cfg.train_unembed
            )
        elif not 1 <= slot < self.num_slots:
            raise AdapterError(f"slot must be in [1, {self.num_slots - 1}], got {slot}")
        self._install_slot(slot, cfg, factors, moment_values, state.step)
        return slot

    def export_peft(self, slot: int, path: str | Path, base_model_name: str | None = None) -> None:
        """Write ``slot`` as a Hugging Face PEFT LoRA directory (for vLLM / PEFT samplers).

        ``base_model_name`` goes to ``base_model_name_or_path`` (default: the model directory).
        """
        self._require(slot)
        cfg = self._adapters[slot]
        flags = {"attn": cfg.train_attn, "mlp": cfg.train_mlp, "unembed": cfg.train_unembed}
        enabled = {module: flags[group] for module, group in self._groups.items()}
        factors = checkpoint.extract_slot(self._lora, slot, cfg.rank)
        name = base_model_name or str(self.model_dir)
        checkpoint.write_peft(path, factors, enabled, cfg, name)

    def export_merged(self, slot: int, path: str | Path) -> None:
        """Write base + ``slot``'s LoRA merged (``W + (α/r)·A·B``) as a plain HF checkpoint.

        Tokenizer and generation files are copied from the base model directory so the result
        loads on its own. A tied-embedding model cannot absorb an ``lm_head`` LoRA (the
        embedding would change too): such an adapter raises :class:`AdapterError`.
        """
        self._require(slot)
        save_hf_weights(self._model(), path, merge_slot=slot)  # type: ignore[arg-type]
        for src in self.model_dir.iterdir():
            if src.is_file() and (src.name.startswith("tokenizer") or src.name in _SIDE_FILES):
                shutil.copy2(src, Path(path) / src.name)


_SIDE_FILES = frozenset(
    {
        "generation_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
    }
)


def _split_moments(
    moments: Mapping[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    m = {k[2:]: v for k, v in moments.items() if k.startswith("m/")}
    v = {k[2:]: v for k, v in moments.items() if k.startswith("v/")}
    if len(m) + len(v) != len(moments):
        bad = sorted(k for k in moments if not k.startswith(("m/", "v/")))
        raise CheckpointError(f"optimizer.safetensors has unexpected keys {bad}")
    return m, v
