"""Build a complete tiny checkpoint directory, and a per-user cache of built presets.

`build_model` writes what a hub repo holds: `config.json`, `generation_config.json`, weights
(single file or shards + index) and the tokenizer files, all deterministic in (preset, seed).
`ensure_model` builds a preset once into a cache directory keyed by preset, seed and
`KIT_VERSION`, publishing it with an atomic rename so concurrent callers (parallel tests, a
demo and a server) never see a half-written model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tx_engine.testing.hf_cache import install_into_hf_cache
from tx_engine.testing.presets import (
    KIT_VERSION,
    get_preset,
    make_config,
    make_generation_config,
)
from tx_engine.testing.tokenizer import build_tokenizer, special_token_ids
from tx_engine.testing.weights import write_weights

DEFAULT_NUM_SHARDS = 3

# Hub name -> (preset, tokenizer_only): the names the cookbook's model table and the SDK's
# tokenizer lookup use, each served by the tiny model of the same family and shape of config.
HUB_ALIASES: dict[str, tuple[str, bool]] = {
    "Qwen/Qwen3-8B": ("tiny-qwen3", False),
    "Qwen/Qwen3-30B-A3B": ("tiny-qwen3-moe", False),
    "meta-llama/Llama-3.1-8B-Instruct": ("tiny-llama3", False),
    "thinkingmachineslabinc/meta-llama-3-instruct-tokenizer": ("tiny-llama3", True),
}


def build_model(
    preset: str,
    out_dir: Path | str,
    *,
    seed: int = 0,
    sharded: bool = False,
    num_shards: int = DEFAULT_NUM_SHARDS,
) -> Path:
    """Write preset `preset` with weights from `seed` into `out_dir`; returns `out_dir`.

    `sharded=True` splits the weights into `num_shards` `model-0000k-of-0000N.safetensors`
    files plus `model.safetensors.index.json`, as large hub checkpoints are stored.
    """
    p = get_preset(preset)
    if seed < 0:
        raise ValueError(f"seed: must be >= 0, got {seed}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = special_token_ids(p.family)
    config = make_config(p, ids)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", make_generation_config(p.family, ids))
    write_weights(config, out, seed=seed, num_shards=num_shards if sharded else 1)
    build_tokenizer(p.family, out)
    return out


def default_cache_root() -> Path:
    """`$TX_HOME/tiny-models`, else `$XDG_CACHE_HOME/tx/tiny-models`, else `~/.cache/...`."""
    if tx_home := os.environ.get("TX_HOME"):
        return Path(tx_home) / "tiny-models"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "tx" / "tiny-models"


def ensure_model(
    preset: str,
    cache_root: Path | str | None = None,
    *,
    seed: int = 0,
    sharded: bool = False,
) -> Path:
    """The directory of a built preset, building it first if this cache lacks it."""
    get_preset(preset)  # fail on a bad name before touching the file system
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    key = f"{preset}-seed{seed}{'-sharded' if sharded else ''}-kit{KIT_VERSION}"
    final = root / key
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        build_model(preset, staging, seed=seed, sharded=sharded)
        os.rename(staging, final)
    except OSError:
        # Another process published the same build first; theirs is byte-identical.
        if not (final / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def install_hub_aliases(
    hf_home: Path | str, *, cache_root: Path | str | None = None
) -> dict[str, Path]:
    """Install every `HUB_ALIASES` name into `hf_home`; returns repo id -> snapshot dir.

    Models come from `ensure_model(preset, cache_root)`, so they are built at most once.
    """
    snapshots = {}
    for repo_id, (preset, tokenizer_only) in HUB_ALIASES.items():
        model_dir = ensure_model(preset, cache_root)
        snapshots[repo_id] = install_into_hf_cache(
            model_dir, repo_id, hf_home, tokenizer_only=tokenizer_only
        )
    return snapshots


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
