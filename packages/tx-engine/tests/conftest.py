"""Session-scoped tiny models for every engine test.

Each fixture builds its preset once per test session (seed 0) into a temporary directory, so
tests share the files and never touch the network or the user's cache. `tiny_hf_home` installs
them under the hub names clients use (`tx_engine.testing.HUB_ALIASES`); run hub-name lookups in a subprocess with
`HF_HOME=<tiny_hf_home>` and `HF_HUB_OFFLINE=1`, since huggingface_hub reads those variables at
import time.

`run_on_simulated_devices` runs a script on N forced host CPU devices (mesh tests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def _run_on_simulated_devices(
    script: str, *args: str, devices: int = 8, timeout: float = 600
) -> dict[str, Any]:
    """Run Python source ``script`` (``sys.argv[1:]`` = ``args``) on ``devices`` host CPUs and
    return its last stdout line, parsed as JSON.

    A fresh interpreter, because XLA fixes the host device count when jax initialises and this
    session's jax already has one device. ``JAX_PLATFORMS=cpu`` so the forced devices are the
    ones used on an accelerator machine too. A failed run fails the test with its stderr.
    """
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
    }
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        pytest.fail(
            f"script on {devices} simulated devices exited {proc.returncode}\n"
            f"--- stdout (tail) ---\n{proc.stdout[-2000:]}\n"
            f"--- stderr (tail) ---\n{proc.stderr[-4000:]}",
            pytrace=False,
        )
    result: dict[str, Any] = json.loads(lines[-1])
    return result


@pytest.fixture
def run_on_simulated_devices() -> Callable[..., dict[str, Any]]:
    """``run(script, *args, devices=8, timeout=600) -> dict``: see `_run_on_simulated_devices`.

    A fixture, not an import: tests run with ``--import-mode=importlib``, where this directory
    is not on ``sys.path``.
    """
    return _run_on_simulated_devices
