"""Adapter training state on disk, and PEFT export for samplers.

An adapter checkpoint is a directory:

* ``adapter.safetensors`` — the slot's LoRA factors, **trimmed to the adapter's rank**
  (``lora_a [.., D_in, r]``, ``lora_b [.., r, D_out]``), keyed by the factor's module path
  (``model.layers.0.self_attn.q_proj.lora.lora_a``);
* ``optimizer.safetensors`` (optional) — AdamW moments ``m/<key>``, ``v/<key>`` trimmed the
  same way, float32;
* ``metadata.json`` — format version, the LoRA config (rank, alpha, seed, target flags) and the
  optimizer step count.

Trimming makes a checkpoint independent of the engine's ``max_lora_rank`` and slot index: it
loads into any slot of any engine whose max rank is at least ``r`` (the padding columns are
exactly zero in a live slot, see :mod:`tx_engine.layers.lora`, so nothing is lost).

:func:`write_peft` writes the sampler-facing form, a Hugging Face PEFT LoRA directory
(``adapter_config.json`` + ``adapter_model.safetensors`` with ``lora_A.weight [r, in]`` /
``lora_B.weight [out, r]`` under ``base_model.model.<module>``), which vLLM and PEFT load as is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from tx_engine import step
from tx_engine.errors import CheckpointError

FORMAT = "tx-adapter"
FORMAT_VERSION = 1
ADAPTER_FILE = "adapter.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
METADATA_FILE = "metadata.json"


@dataclass(frozen=True)
class LoraConfig:
    """What an adapter slot was created with; saved with every checkpoint."""

    rank: int
    alpha: float
    seed: int
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraConfig:
        try:
            return cls(
                rank=int(data["rank"]),
                alpha=float(data["alpha"]),
                seed=int(data["seed"]),
                train_attn=bool(data["train_attn"]),
                train_mlp=bool(data["train_mlp"]),
                train_unembed=bool(data["train_unembed"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"metadata.json lora_config is invalid: {exc!r}") from None


@dataclass(frozen=True)
class AdapterState:
    """One adapter's training state as host arrays (rank-trimmed)."""

    lora_config: LoraConfig
    factors: dict[str, np.ndarray]
    moments: dict[str, np.ndarray] | None  # "m/<key>", "v/<key>"
    step: int


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def named_leaves(tree: Any) -> list[tuple[str, Any]]:
    """``(dotted module path, array)`` for every leaf of a LoRA-shaped state tree."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    out = []
    for path, leaf in flat:
        parts = [_key_name(k) for k in path]
        if parts and parts[-1] == "value":  # nnx.Variable's own pytree node
            parts = parts[:-1]
        out.append((".".join(parts), leaf))
    return out


def trim(name: str, arr: np.ndarray, rank: int) -> np.ndarray:
    """The first ``rank`` components of a factor: last axis of ``lora_a``, second-last of ``lora_b``."""
    if name.endswith("lora_a"):
        return arr[..., :rank]
    if name.endswith("lora_b"):
        return arr[..., :rank, :]
    raise CheckpointError(f"{name}: not a LoRA factor (expected a name ending in lora_a/lora_b)")


def extract_slot(tree: Any, slot: int, rank: int) -> dict[str, np.ndarray]:
    """One slot of a LoRA-shaped tree (params or a moment), rank-trimmed, as NumPy.

    One compiled slice of the whole tree and one device-to-host copy, not one per leaf.
    """
    return trimmed(jax.device_get(step.take_slot(tree, jnp.int32(slot))), rank)


def trimmed(sliced: Any, rank: int) -> dict[str, np.ndarray]:
    """A host copy of one slot's tree (``step.take_slot`` output) as named rank-trimmed arrays."""
    return {name: trim(name, np.asarray(leaf), rank) for name, leaf in named_leaves(sliced)}


def check_fits(
    tree: Any, tensors: Mapping[str, np.ndarray], what: str, rank: int | None = None
) -> None:
    """Raise :class:`CheckpointError` unless ``tensors`` can fill one slot of ``tree``.

    Key sets must match exactly and every tensor must have the slot's shape except for a rank
    no larger than the slot's (and equal to ``rank`` when given); the message lists every
    difference, so a checkpoint of another model fails loudly — before any slot is touched.
    """
    leaves = named_leaves(tree)
    names = {n for n, _ in leaves}
    missing, unexpected = sorted(names - set(tensors)), sorted(set(tensors) - names)
    if missing or unexpected:
        raise CheckpointError(f"{what}: missing keys {missing}, unexpected keys {unexpected}")
    for name, leaf in leaves:
        shape = tuple(np.shape(tensors[name]))
        full = tuple(leaf.shape[1:])
        axis = len(full) - (1 if name.endswith("lora_a") else 2)
        fits = len(shape) == len(full) and all(
            s == f if i != axis else s <= f and rank in (None, s)
            for i, (s, f) in enumerate(zip(shape, full, strict=True))
        )
        if not fits:
            raise CheckpointError(
                f"{what}: {name} has shape {shape}, which does not fit slot shape {full}"
                + (f" at rank {rank}" if rank is not None else "")
            )


def slot_values(tree: Any, tensors: Mapping[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """One slot's value per leaf of ``tree`` (leaf order), from rank-trimmed ``tensors``
    zero-padded to the max rank: what :func:`tx_engine.slot_programs.set_slot` writes.
    ``tensors`` must fit (:func:`check_fits`, which the caller runs before touching a slot)."""
    values = []
    for name, leaf in named_leaves(tree):
        src = np.asarray(tensors[name])
        padded = np.zeros(leaf.shape[1:], np.float32)
        padded[tuple(slice(0, s) for s in src.shape)] = src
        values.append(padded)
    return tuple(values)


def save_adapter(path: str | Path, state: AdapterState) -> None:
    """Write ``state`` into directory ``path`` (created if needed; files are overwritten)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in state.factors.items()}, out / ADAPTER_FILE)
    if state.moments is not None:
        moments = {k: np.ascontiguousarray(v, np.float32) for k, v in state.moments.items()}
        save_file(moments, out / OPTIMIZER_FILE)
    elif (out / OPTIMIZER_FILE).exists():
        (out / OPTIMIZER_FILE).unlink()  # never pair new weights with stale moments
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lora_config": asdict(state.lora_config),
        "step": state.step,
        "has_optimizer": state.moments is not None,
    }
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def load_adapter(path: str | Path, with_optimizer: bool = True) -> AdapterState:
    """Read a directory written by :func:`save_adapter`.

    ``with_optimizer=True`` on a checkpoint saved without optimizer state is an error rather
    than a silent reset, so a resumed run never restarts its moments unknowingly.
    """
    src = Path(path)
    meta_path = src / METADATA_FILE
    if not meta_path.is_file() or not (src / ADAPTER_FILE).is_file():
        raise CheckpointError(
            f"{src} is not an adapter checkpoint ({METADATA_FILE} and {ADAPTER_FILE} required)"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: not a JSON object")
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: format {meta.get('format')!r} v{meta.get('format_version')!r}, "
            f"expected {FORMAT!r} v{FORMAT_VERSION}"
        )
    moments = None
    if with_optimizer:
        if not meta.get("has_optimizer") or not (src / OPTIMIZER_FILE).is_file():
            raise CheckpointError(f"{src} was saved without optimizer state")
        moments = _read_tensors(src / OPTIMIZER_FILE)
    return AdapterState(
        lora_config=LoraConfig.from_dict(meta.get("lora_config", {})),
        factors=_read_tensors(src / ADAPTER_FILE),
        moments=moments,
        step=int(meta.get("step", 0)),
    )


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of one safetensors file; a damaged file is a :class:`CheckpointError`
    naming it (category ``user``), not the library's ``SafetensorError``."""
    try:
        return dict(load_file(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from e


def peft_tensors(
    factors: Mapping[str, np.ndarray], enabled: Mapping[str, bool]
) -> dict[str, np.ndarray]:
    """PEFT keys and layouts for rank-trimmed factors of the modules ``enabled`` marks on.

    ``<module>.lora.lora_a [in, r]`` becomes ``base_model.model.<module>.lora_A.weight [r, in]``,
    ``lora_b [r, out]`` becomes ``lora_B.weight [out, r]``. Expert factors (a leading ``E``
    axis) are written per expert as ``<module_parent>.experts.{j}.<proj>`` would be in a
    per-expert HF layout; their names are produced by the same rule with the expert index.
    """
    out: dict[str, np.ndarray] = {}
    for name, arr in factors.items():
        module = name.rsplit(".lora.", 1)[0]
        if not enabled.get(module, False):
            continue
        suffix = "lora_A" if name.endswith("lora_a") else "lora_B"
        if arr.ndim == 2:
            out[f"base_model.model.{module}.{suffix}.weight"] = np.ascontiguousarray(arr.T)
            continue
        parent, proj = module.rsplit(".", 1)
        for j in range(arr.shape[0]):
            key = f"base_model.model.{parent}.{j}.{proj}.{suffix}.weight"
            out[key] = np.ascontiguousarray(arr[j].T)
    return out


def write_peft(
    path: str | Path,
    factors: Mapping[str, np.ndarray],
    enabled: Mapping[str, bool],
    lora_config: LoraConfig,
    base_model_name: str | None = None,
) -> None:
    """Write a PEFT LoRA adapter directory for the modules marked in ``enabled``."""
    tensors = peft_tensors(factors, enabled)
    if not tensors:
        raise CheckpointError("adapter targets no module; nothing to export")
    targets = sorted({k.split(".")[-3] for k in tensors})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "r": lora_config.rank,
        "lora_alpha": lora_config.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "target_modules": targets,
        "inference_mode": True,
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def variable_names(state: nnx.State[Any, Any]) -> list[str]:
    """Dotted names of a LoRA state's leaves, in flattening order (for diagnostics)."""
    return [name for name, _ in named_leaves(state)]
