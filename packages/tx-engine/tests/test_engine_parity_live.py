"""Live parity against transformers + torch (``nox -s parity``; skipped without torch).

Regenerates each golden into a temporary directory with ``scripts/make_engine_goldens.py``,
recomputes the reference logits with transformers, and checks ours (same metric as the
default suite: ``max|ours − ref| / max|ref|`` over real positions ≤ 1e-4). Also checks that
a checkpoint we save, with a LoRA adapter merged, loads in ``transformers.from_pretrained`` and
reproduces our adapter's logits, and that the committed goldens are still what the script
produces.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from tx_engine.layers.lora import LoRAParam, init_adapter
from tx_engine.loading import load_model, save_hf_weights

pytestmark = pytest.mark.parity

ROOT = Path(__file__).resolve().parents[3]
GOLDENS = Path(__file__).parent / "goldens"
ARCHS = ["llama", "qwen3", "qwen3_moe"]


def golden_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_engine_goldens", ROOT / "scripts/make_engine_goldens.py")  # fmt: skip
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def ours(model: Any, b: dict[str, np.ndarray], slot: int = 0) -> np.ndarray:
    slots = jnp.full((b["input_ids"].shape[0],), slot, jnp.int32)
    h = model(
        jnp.asarray(b["input_ids"]),
        positions_bt=jnp.asarray(b["position_ids"]),
        attention_mask_bt=jnp.asarray(b["attention_mask"]),
        adapter_indices_b=slots,
    )
    return np.asarray(model.compute_logits(h, slots))[:, int(b["logits_start"]) :]


def rel_error(a: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    valid = mask.astype(bool)
    return float(np.abs(a - ref)[valid].max() / np.abs(ref[valid]).max())


@pytest.mark.parametrize("arch", ARCHS)
def test_live_logits_match_transformers(arch: str, tmp_path: Path) -> None:
    script = golden_script()
    script.write_golden(arch, tmp_path)
    model, _ = load_model(tmp_path, max_lora_adapters=2, max_lora_rank=2)
    batches = script.make_batches(arch, script.CONFIGS[arch]["vocab_size"], 0)
    for b, ref in zip(batches, script.reference_logits(tmp_path, batches), strict=True):
        mask = b["attention_mask"][:, int(b["logits_start"]) :]
        err = rel_error(ours(model, b), ref, mask)
        print(f"{arch}: rel error {err:.2e}")
        assert err <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_committed_goldens_are_reproducible(arch: str, tmp_path: Path) -> None:
    golden_script().write_golden(arch, tmp_path)
    fresh, committed = np.load(tmp_path / "logits.npz"), np.load(GOLDENS / arch / "logits.npz")
    assert sorted(fresh.files) == sorted(committed.files)
    for k in fresh.files:
        np.testing.assert_allclose(fresh[k], committed[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_merged_checkpoint_loads_in_transformers(arch: str, tmp_path: Path) -> None:
    script = golden_script()
    model, _ = load_model(GOLDENS / arch, max_lora_adapters=2, max_lora_rank=4)
    init_adapter(model, 1, rank=4, alpha=8.0, seed=0, train_unembed=arch != "qwen3")
    rng = np.random.default_rng(1)
    import jax
    from flax import nnx

    for path, var in nnx.to_flat_state(nnx.state(model, LoRAParam)):
        if path[-1] == "lora_b":
            value = np.array(var[...])
            value[1] = 0.05 * rng.standard_normal(value.shape[1:])
            var.set_value(jax.numpy.asarray(value))
    save_hf_weights(model, tmp_path, merge_slot=1)
    batch = script.make_batches(arch, script.CONFIGS[arch]["vocab_size"], 0)[0]
    (ref,) = script.reference_logits(tmp_path, [batch])
    err = rel_error(ours(model, batch, slot=1), ref, batch["attention_mask"])
    print(f"{arch}: merged-LoRA rel error {err:.2e}")
    assert err <= 1e-4
