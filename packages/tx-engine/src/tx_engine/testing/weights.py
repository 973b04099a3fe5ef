"""Seeded random weights in Hugging Face hub layout, written as (optionally sharded) safetensors.

Design:
- `tensor_shapes(config)` is the single source of truth for names and shapes; the writer, the
  parameter count and the tests all use it, so the count asserted for `small` is the count of
  what is actually written.
- Each tensor draws from its own `numpy.random.Generator` seeded by (seed, sha256(name)), so a
  tensor's values do not depend on which other tensors exist or the order they are made in.
- Init follows transformers' `_init_weights`: normal(0, initializer_range) for linear and
  embedding weights (the MoE router included), ones for RMSNorm weights.
- Files carry the `{"format": "pt"}` metadata real hub files have, because
  `transformers.from_pretrained` rejects safetensors files without a known format.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

_DTYPES: dict[str, Any] = {"float32": np.float32, "float16": np.float16}
_HUB_METADATA = {"format": "pt"}


def tensor_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every weight of a Llama / Qwen3 / Qwen3-MoE checkpoint, hub names, canonical order."""
    d = int(config["hidden_size"])
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config["vocab_size"], d)}
    for i in range(int(config["num_hidden_layers"])):
        shapes.update(_layer_shapes(config, i))
    shapes["model.norm.weight"] = (d,)
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], d)
    return shapes


def _layer_shapes(config: Mapping[str, Any], i: int) -> dict[str, tuple[int, ...]]:
    d, n_q, n_kv = (
        config["hidden_size"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
    )
    h = config.get("head_dim") or d // n_q
    p = f"model.layers.{i}."
    shapes: dict[str, tuple[int, ...]] = {
        p + "input_layernorm.weight": (d,),
        p + "self_attn.q_proj.weight": (n_q * h, d),
        p + "self_attn.k_proj.weight": (n_kv * h, d),
        p + "self_attn.v_proj.weight": (n_kv * h, d),
        p + "self_attn.o_proj.weight": (d, n_q * h),
    }
    if config["model_type"] in ("qwen3", "qwen3_moe"):
        shapes[p + "self_attn.q_norm.weight"] = (h,)
        shapes[p + "self_attn.k_norm.weight"] = (h,)
    shapes[p + "post_attention_layernorm.weight"] = (d,)
    if is_sparse_layer(config, i):
        f, n_e = config["moe_intermediate_size"], config["num_experts"]
        shapes[p + "mlp.gate.weight"] = (n_e, d)
        for j in range(n_e):
            shapes.update(_mlp_shapes(f"{p}mlp.experts.{j}.", d, f))
    else:
        shapes.update(_mlp_shapes(p + "mlp.", d, config["intermediate_size"]))
    return shapes


def _mlp_shapes(prefix: str, d: int, f: int) -> dict[str, tuple[int, ...]]:
    return {
        prefix + "gate_proj.weight": (f, d),
        prefix + "up_proj.weight": (f, d),
        prefix + "down_proj.weight": (d, f),
    }


def is_sparse_layer(config: Mapping[str, Any], i: int) -> bool:
    """Qwen3-MoE's rule (transformers `Qwen3MoeDecoderLayer`) for which layers hold experts."""
    if config["model_type"] != "qwen3_moe" or config.get("num_experts", 0) <= 0:
        return False
    step = config.get("decoder_sparse_step", 1)
    return i not in (config.get("mlp_only_layers") or []) and (i + 1) % step == 0


def count_parameters(config: Mapping[str, Any]) -> int:
    """Number of scalars in the checkpoint `config` describes (tied embeddings counted once)."""
    return sum(int(np.prod(s)) for s in tensor_shapes(config).values())


def init_tensor(name: str, shape: tuple[int, ...], config: Mapping[str, Any], seed: int) -> Any:
    """One tensor's initial value, a function of (seed, name, shape, config) only."""
    dtype = _dtype(config)
    if name.endswith("norm.weight"):
        return np.ones(shape, dtype=dtype)
    name_words = np.frombuffer(hashlib.sha256(name.encode()).digest(), dtype=np.uint32)
    rng = np.random.default_rng(np.random.SeedSequence([seed, *name_words.tolist()]))
    std = np.float32(config.get("initializer_range", 0.02))
    return (rng.standard_normal(shape, dtype=np.float32) * std).astype(dtype)


def _dtype(config: Mapping[str, Any]) -> Any:
    name = config.get("torch_dtype", "float32")
    if name not in _DTYPES:
        raise ValueError(f"torch_dtype: {name!r} is not supported; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def iter_tensors(config: Mapping[str, Any], seed: int) -> Iterator[tuple[str, Any]]:
    """(name, array) for every weight, in canonical order, materialized one at a time."""
    for name, shape in tensor_shapes(config).items():
        yield name, init_tensor(name, shape, config, seed)


def write_weights(
    config: Mapping[str, Any], out_dir: Path, *, seed: int, num_shards: int = 1
) -> list[Path]:
    """Write `model.safetensors`, or `num_shards` shards plus `model.safetensors.index.json`."""
    if num_shards < 1:
        raise ValueError(f"num_shards: must be >= 1, got {num_shards}")
    shapes = tensor_shapes(config)
    # A previous build with another layout must not leave weights a loader would also pick up.
    for stale in [*out_dir.glob("model-*-of-*.safetensors"), *out_dir.glob("model.safetensors*")]:
        stale.unlink()
    if num_shards == 1:
        path = out_dir / "model.safetensors"
        safetensors.numpy.save_file(dict(iter_tensors(config, seed)), path, _HUB_METADATA)
        return [path]
    groups = _plan_shards(shapes, num_shards, np.dtype(_dtype(config)).itemsize)
    paths, weight_map = [], {}
    for k, names in enumerate(groups, start=1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: init_tensor(n, shapes[n], config, seed) for n in names}
        safetensors.numpy.save_file(tensors, out_dir / fname, _HUB_METADATA)
        weight_map.update(dict.fromkeys(names, fname))
        paths.append(out_dir / fname)
    total = sum(int(np.prod(s)) for s in shapes.values()) * np.dtype(_dtype(config)).itemsize
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    index_path = out_dir / "model.safetensors.index.json"
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    return [*paths, index_path]


def _plan_shards(
    shapes: Mapping[str, tuple[int, ...]], num_shards: int, itemsize: int
) -> list[list[str]]:
    """Split names, in order, into `num_shards` contiguous groups of roughly equal bytes."""
    names = list(shapes)
    if num_shards > len(names):
        raise ValueError(f"num_shards: {num_shards} exceeds the {len(names)} tensors to shard")
    sizes = [int(np.prod(shapes[n])) * itemsize for n in names]
    target = sum(sizes) / num_shards
    groups: list[list[str]] = [[]]
    filled = 0.0
    for idx, (name, size) in enumerate(zip(names, sizes, strict=True)):
        remaining_names = len(names) - idx
        remaining_groups = num_shards - len(groups)
        full = filled + size / 2 > target * len(groups)
        # Open a new shard when this one is full, or when every later shard still needs a tensor.
        if groups[-1] and remaining_groups > 0 and (full or remaining_names <= remaining_groups):
            groups.append([])
        groups[-1].append(name)
        filled += size
    return groups


def read_all_tensors(model_dir: Path) -> dict[str, Any]:
    """Load every tensor of a single-file or sharded checkpoint (for tests and tools)."""
    out: dict[str, Any] = {}
    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model_dir: no model*.safetensors in {model_dir}")
    for f in files:
        out.update(safetensors.numpy.load_file(f))
    return out
