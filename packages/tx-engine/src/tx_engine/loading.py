"""Load Hugging Face checkpoints into tx-engine models, and save them back.

``load_model`` reads ``config.json``, picks the class from ``architectures``, builds the model
*abstractly* with ``nnx.eval_shape`` (no random init of base weights), then fills every base
parameter from the safetensors files. The HF key of a parameter is its nnx path joined by dots
(attribute names mirror HF); the only transforms are the per-parameter ``hf_layout``s declared
by the layers (see ``layers/common.py``). LoRA factors and scalings start at zero (all slots
free). Every missing and every unexpected key is reported in one :class:`CheckpointError`.
Override table: a tied model ignores a stray ``lm_head.weight`` (some hub checkpoints ship one;
transformers ignores it too).

With a ``mesh``, each tensor is built with ``jax.make_array_from_callback`` from a memory-mapped
host view, so every device copies only its own slice.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from tx_engine.errors import AdapterError, CheckpointError, ConfigError
from tx_engine.layers.linear import LoRASpec
from tx_engine.layers.lora import LoRAFactors, LoRAParam, LoRAScaling
from tx_engine.models import LlamaConfig, LlamaForCausalLM, model_class_for
from tx_engine.safetensors_io import checkpoint_files, iter_tensors, write_file
from tx_engine.sharding import variable_sharding

Path_ = tuple[Any, ...]


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.exists():
        raise ConfigError(f"{model_dir} has no config.json")
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return data


def hf_keys(path: Path_, var: nnx.Variable[Any]) -> list[str]:
    """The checkpoint key(s) holding ``var``: one, or one per expert for ``experts`` layout."""
    names = [str(p) for p in path]
    if var.get_metadata().get("hf_layout") == "experts":
        prefix, proj = ".".join(names[:-2]), ".".join(names[-2:])
        return [f"{prefix}.{j}.{proj}" for j in range(var.shape[0])]
    return [".".join(names)]


def to_ours(layout: str, arrays: list[np.ndarray]) -> np.ndarray:
    """HF tensor(s) → our layout (inverse of :func:`to_hf`)."""
    if layout == "identity":
        return arrays[0]
    if layout == "linear":
        return arrays[0].T
    if layout == "experts":
        return np.stack([a.T for a in arrays])
    raise CheckpointError(f"unknown hf_layout {layout!r}")


def to_hf(layout: str, value: np.ndarray) -> list[np.ndarray]:
    if layout == "identity":
        return [value]
    if layout == "linear":
        return [value.T]
    return [value[j].T for j in range(value.shape[0])]


def _base_params(state: nnx.State[Any, Any]) -> Iterator[tuple[Path_, nnx.Variable[Any]]]:
    for path, var in nnx.to_flat_state(state):
        if isinstance(var, nnx.Param):
            yield path, var


def _place(host: np.ndarray, var: nnx.Variable[Any], mesh: Mesh | None) -> jax.Array:
    if mesh is None:
        return jnp.asarray(host)
    sharding = variable_sharding(var, mesh)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _collect(model_dir: Path, wanted: set[str], tied: bool) -> dict[str, np.ndarray]:
    """Memory-mapped views of every wanted key; fails listing all missing/unexpected keys."""
    found: dict[str, np.ndarray] = {}
    unexpected: list[str] = []
    for file in checkpoint_files(model_dir):
        for name, view in iter_tensors(file):
            if name in wanted:
                found[name] = view
            elif not (tied and name == "lm_head.weight"):
                unexpected.append(name)
    missing = sorted(wanted - found.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {model_dir} does not match the model: "
            f"missing keys ({len(missing)}): {missing}; unexpected keys ({len(unexpected)}): "
            f"{sorted(unexpected)}"
        )
    return found


def load_model(
    model_dir: str | Path,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype | None = jnp.float32,
    max_lora_adapters: int = 5,
    max_lora_rank: int = 32,
    mesh: Mesh | None = None,
    remat: bool = False,
) -> tuple[LlamaForCausalLM, LlamaConfig]:
    """Build the model of ``model_dir`` and fill it from its safetensors.

    ``dtype`` is the activation dtype; ``param_dtype`` the storage dtype of base weights
    (``None`` keeps each tensor's checkpoint dtype). ``max_lora_adapters`` is the size ``A``
    of the adapter axis *including* the reserved base slot 0, so ``A - 1`` tenants fit (slots
    ``1..A-1``); ``max_lora_rank`` is ``R``.
    """
    model_dir = Path(model_dir)
    cfg_dict = read_config(model_dir)
    cls = model_class_for(cfg_dict)
    config = cls.config_class.from_hf(cfg_dict)
    lora = LoRASpec(max_lora_adapters, max_lora_rank)
    abstract = nnx.eval_shape(
        lambda: cls(
            config,
            lora=lora,
            dtype=dtype,
            param_dtype=param_dtype or jnp.float32,
            remat=remat,
            rngs=nnx.Rngs(0),
        )
    )
    graphdef, state = nnx.split(abstract)
    params = list(_base_params(state))
    wanted = {k for path, var in params for k in hf_keys(path, var)}
    found = _collect(model_dir, wanted, config.tie_word_embeddings)
    for path, var in nnx.to_flat_state(state):
        if isinstance(var, (LoRAParam, LoRAScaling)):
            var.set_value(_place(np.zeros(var.shape, var.dtype), var, mesh))
            continue
        layout = var.get_metadata()["hf_layout"]
        host = to_ours(layout, [found[k] for k in hf_keys(path, var)])
        if host.shape != var.shape:
            raise CheckpointError(
                f"{hf_keys(path, var)[0]}: checkpoint shape {host.shape} (our layout) "
                f"!= model shape {var.shape}"
            )
        host = host.astype(param_dtype) if param_dtype is not None else host
        var.set_value(_place(np.ascontiguousarray(host), var, mesh))
    return nnx.merge(graphdef, state), config


def _merged_weight(module: Any, slot: int) -> np.ndarray:
    """``W + scaling·A·B`` of ``slot`` for a module with ``weight`` and ``lora`` children."""
    w = np.asarray(module.weight[...], np.float32)
    lora: LoRAFactors = module.lora
    s = float(lora.lora_scaling[...][slot])
    a = np.asarray(lora.lora_a[...][slot], np.float32)
    b = np.asarray(lora.lora_b[...][slot], np.float32)
    return w + s * (a @ b)


def save_hf_weights(
    model: LlamaForCausalLM, out_dir: str | Path, *, merge_slot: int | None = None
) -> None:
    """Write ``config.json`` + ``model.safetensors`` under HF key names.

    With ``merge_slot``, that adapter's LoRA is merged into the base weights (``W + s·A·B``)
    so the result is a plain HF checkpoint of the fine-tuned model.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    if merge_slot is not None and cfg.tie_word_embeddings:
        scale = float(model.lm_head.lora.lora_scaling[...][merge_slot])
        if scale != 0.0:
            raise AdapterError("cannot merge an lm_head LoRA into tied embeddings")
    tensors: dict[str, np.ndarray] = {}
    for path, var in _base_params(nnx.state(model)):
        module: Any = model
        for p in path[:-1]:
            module = module[p] if isinstance(p, int) else getattr(module, p)
        has_lora = path[-1] == "weight" and isinstance(getattr(module, "lora", None), LoRAFactors)
        value = (
            _merged_weight(module, merge_slot)
            if merge_slot is not None and has_lora
            else np.asarray(var[...])
        )
        layout = var.get_metadata()["hf_layout"]
        for key, arr in zip(hf_keys(path, var), to_hf(layout, value), strict=True):
            tensors[key] = np.ascontiguousarray(arr)
    (out_dir / "config.json").write_text(json.dumps(dict(cfg.hf_config), indent=2) + "\n")
    write_file(out_dir / "model.safetensors", tensors)
