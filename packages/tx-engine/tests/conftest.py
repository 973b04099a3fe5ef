"""Session-scoped tiny models for every engine test.

Each fixture builds its preset once per test session (seed 0) into a temporary directory, so
tests share the files and never touch the network or the user's cache. `tiny_hf_home` installs
them under the hub names clients use (`tx_engine.testing.HUB_ALIASES`); run hub-name lookups in a subprocess with
`HF_HOME=<tiny_hf_home>` and `HF_HUB_OFFLINE=1`, since huggingface_hub reads those variables at
import time.
"""

from __future__ import annotations

from pathlib import Path

import jax
import pytest

from tx_engine.testing import build_model, install_hub_aliases

# On GPUs JAX's default float32 matmul uses TF32 (10-bit mantissa): logits then differ from
# transformers by ~1e-3 relative (measured on an H100), ten times the parity tolerance. The
# reference comparisons are about the model, not the tensor-core mode, so run them at full
# float32 there; on CPU this is already the default and changes nothing.
if jax.default_backend() != "cpu":
    jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def tiny_models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory under which the session's tiny models are built."""
    return tmp_path_factory.mktemp("tiny-models")


def _build_once(root: Path, preset: str, *, sharded: bool = False) -> Path:
    out = root / (preset + ("-sharded" if sharded else ""))
    if not (out / "config.json").is_file():
        build_model(preset, out, seed=0, sharded=sharded)
    return out


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tiny_models_root: Path) -> Path:
    """`tiny-qwen3`: Qwen3 dense, tied embeddings, single `model.safetensors`."""
    return _build_once(tiny_models_root, "tiny-qwen3")


@pytest.fixture(scope="session")
def tiny_llama3_dir(tiny_models_root: Path) -> Path:
    """`tiny-llama3`: Llama 3.1, untied `lm_head`, llama3 rope scaling."""
    return _build_once(tiny_models_root, "tiny-llama3")


@pytest.fixture(scope="session")
def tiny_qwen3_moe_dir(tiny_models_root: Path) -> Path:
    """`tiny-qwen3-moe`: Qwen3-MoE, 8 experts top-2, untied `lm_head`."""
    return _build_once(tiny_models_root, "tiny-qwen3-moe")


@pytest.fixture(scope="session")
def tiny_qwen3_moe_sharded_dir(tiny_models_root: Path) -> Path:
    """`tiny-qwen3-moe` stored as 3 shards plus `model.safetensors.index.json`."""
    return _build_once(tiny_models_root, "tiny-qwen3-moe", sharded=True)


@pytest.fixture(scope="session")
def tiny_hf_home(tiny_models_root: Path) -> Path:
    """An `HF_HOME` where the hub names of `HUB_ALIASES` resolve offline to tiny models."""
    hf_home = tiny_models_root / "hf-home"
    install_hub_aliases(hf_home, cache_root=tiny_models_root / "cache")
    return hf_home
