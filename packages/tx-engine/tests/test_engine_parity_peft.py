"""Trained adapters against Hugging Face PEFT + transformers (``nox -s parity``).

For each tiny architecture the engine trains adapters for two AdamW steps (so every ``B`` is
non-zero and the ``A`` gradients are real) — on tied-embedding Qwen3 one slot with and one
without an ``lm_head`` LoRA, since only the latter can be merged — then:

* ``export_peft`` loads with ``peft.PeftModel.from_pretrained`` on the float32 transformers
  model and gives the engine's logits; for Qwen3-MoE this also exercises PEFT's conversion of
  our per-expert keys to transformers 5's fused ``gate_up_proj`` / ``down_proj`` experts;
* ``export_merged`` loads with ``AutoModelForCausalLM.from_pretrained`` and gives them too;
* the LoRA gradients of one ``forward_backward`` (``cross_entropy`` with non-uniform weights)
  equal torch autograd through the PEFT model.

Gradients are compared in our layout. Where each of our factor entries lives among PEFT's
parameters (transposed for linear layers; fused, rank-concatenated and block-diagonal for
experts) is read off an adapter whose entries are their own indices, loaded the same way: the
conversions only move entries, so the map is exact and needs no copy of PEFT's layout rules.
Metric everywhere: ``max|ours − ref| / max|ref|`` ≤ 1e-4 (float32). The engine's full logits
and its gradient accumulator are read from its private state: its API returns only target
log-probs and applies gradients without returning them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors.numpy import load_file, save_file  # noqa: E402

from tx_engine import checkpoint  # noqa: E402
from tx_engine.config import EngineConfig  # noqa: E402
from tx_engine.engine import AdamParams, AdapterBatch, DatumArrays, TrainingEngine  # noqa: E402
from tx_engine.errors import AdapterError  # noqa: E402

pytestmark = pytest.mark.parity

PRESETS = ["tiny-qwen3", "tiny-llama3", "tiny-qwen3-moe"]
RANK, ALPHA, ROWS, LEN = 4, 8.0, 3, 12
TOL = 1e-4


@dataclass
class Adapter:
    """One trained slot, its gradient on the gradient batch, and its logits."""

    slot: int
    mergeable: bool  # False: an lm_head LoRA on tied embeddings, which export_merged refuses
    grads: dict[str, np.ndarray]  # our factor name -> gradient, rank-trimmed, our layout
    logits: np.ndarray  # [ROWS, LEN, V] on ids[:, :-1]


@dataclass
class Trained:
    """An engine with trained slots, after one more ``forward_backward`` on ``ids``."""

    engine: TrainingEngine
    model_dir: Path
    ids: np.ndarray  # [ROWS, LEN + 1]: inputs are [:, :-1], targets [:, 1:]
    weights: np.ndarray  # [ROWS, LEN] cross_entropy weights
    adapters: list[Adapter]


def _batch(ids: np.ndarray, weights: np.ndarray) -> list[DatumArrays]:
    return [
        DatumArrays(row[:-1], {"target_tokens": row[1:], "weights": w})
        for row, w in zip(ids, weights, strict=True)
    ]


@pytest.fixture(scope="module", params=PRESETS)
def trained(request: pytest.FixtureRequest) -> Trained:
    """Every slot trains all of attn/mlp/lm_head, except that a tied model gets one slot
    without lm_head (mergeable) and one with it (PEFT only). Tenants share each call."""
    model_dir: Path = request.getfixturevalue(request.param.replace("-", "_") + "_dir")
    engine = TrainingEngine(model_dir, EngineConfig(max_lora_adapters=2, max_lora_rank=RANK))
    tied = bool(engine.model_config.tie_word_embeddings)
    slots = {engine.create_adapter(RANK, alpha=ALPHA, seed=3): not tied}
    if tied:
        slots[engine.create_adapter(RANK, alpha=ALPHA, seed=4, train_unembed=False)] = True
    rng = np.random.default_rng(0)
    train_ids = rng.integers(3, engine.vocab_size, (2, LEN + 1))
    for _ in range(2):
        engine.forward_backward(
            [AdapterBatch(s, _batch(train_ids, np.ones((2, LEN)))) for s in slots]
        )
        engine.optim_steps(dict.fromkeys(slots, AdamParams(learning_rate=1e-2)))
    ids = rng.integers(3, engine.vocab_size, (ROWS, LEN + 1))
    weights = rng.uniform(-0.5, 2.0, (ROWS, LEN)).astype(np.float32)
    weights[0, :3] = 0.0  # ignored prompt tokens, as a chat datum would have
    engine.forward_backward([AdapterBatch(s, _batch(ids, weights)) for s in slots])
    adapters = [
        Adapter(
            slot,
            mergeable,
            checkpoint.extract_slot(engine._grads, slot, RANK),
            engine_logits(engine, slot, ids[:, :-1]),
        )
        for slot, mergeable in slots.items()
    ]
    return Trained(engine, model_dir, ids, weights, adapters)


def engine_logits(engine: TrainingEngine, slot: int, ids: np.ndarray) -> np.ndarray:
    """Full ``[ROWS, LEN, V]`` logits of ``slot`` (the engine API only gives logprobs)."""
    model: Any = engine._model()
    slots = jnp.full((ROWS,), slot, jnp.int32)
    hidden = model(
        jnp.asarray(ids),
        positions_bt=jnp.broadcast_to(jnp.arange(LEN), (ROWS, LEN)),
        attention_mask_bt=jnp.ones((ROWS, LEN), bool),
        adapter_indices_b=slots,
    )
    return np.asarray(model.compute_logits(hidden, slots))


def rel_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def load_hf(model_dir: Path) -> Any:
    """transformers in float32 with eager attention, refusing any key it would random-init."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"transformers did not load {model_dir} cleanly: {bad}"
    return model


def load_peft(model_dir: Path, adapter_dir: Path, trainable: bool = False) -> Any:
    model = peft.PeftModel.from_pretrained(load_hf(model_dir), adapter_dir, is_trainable=trainable)
    model.eval()  # lora_dropout is 0 anyway; eval() only makes that explicit
    return model


def hf_logits(model: Any, t: Trained) -> Any:
    return model(input_ids=torch.from_numpy(t.ids[:, :-1])).logits


def test_export_peft_reproduces_engine_logits(trained: Trained, tmp_path: Path) -> None:
    for adapter in trained.adapters:
        out = tmp_path / str(adapter.slot)
        trained.engine.export_peft(adapter.slot, out)
        model = load_peft(trained.model_dir, out)
        with torch.no_grad():
            ref = hf_logits(model, trained).numpy()
            with model.disable_adapter():
                base = hf_logits(model, trained).numpy()
        err = rel_error(adapter.logits, ref)
        print(f"{trained.model_dir.name} slot {adapter.slot}: PEFT logits rel error {err:.2e}")
        assert err <= TOL
        # The adapter must matter, or the comparison above would not test it.
        assert rel_error(base, ref) > 100 * TOL


def test_export_merged_reproduces_engine_logits(trained: Trained, tmp_path: Path) -> None:
    for adapter in trained.adapters:
        out = tmp_path / str(adapter.slot)
        if not adapter.mergeable:
            with pytest.raises(AdapterError, match="tied embeddings"):
                trained.engine.export_merged(adapter.slot, out)
            continue
        trained.engine.export_merged(adapter.slot, out)
        with torch.no_grad():
            ref = hf_logits(load_hf(out), trained).numpy()
        err = rel_error(adapter.logits, ref)
        print(f"{trained.model_dir.name} slot {adapter.slot}: merged logits rel error {err:.2e}")
        assert err <= TOL


# ----------------------------------------------------------------------------- gradients


def _index_tags(factors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each factor entry replaced by its 1-based global index (exact in float32 below 2**24)."""
    out, start = {}, 1
    for name in sorted(factors):
        size = factors[name].size
        out[name] = np.arange(start, start + size, dtype=np.float32).reshape(factors[name].shape)
        start += size
    assert start < 2**24
    return out


def _lora_params(model: Any) -> Iterator[tuple[str, Any]]:
    for name, param in model.named_parameters():
        if "lora_" in name:
            yield name, param


def peft_locations(
    model_dir: Path, shapes: dict[str, np.ndarray], export_dir: Path, tag_dir: Path
) -> dict[str, tuple[str, Any]]:
    """Our factor name -> (PEFT parameter name, flat PEFT index of each of our flat entries).

    ``shapes`` holds one array per factor of ours (any values). Factors of modules the adapter
    does not target are left out: they are not exported.
    """
    tags = _index_tags(shapes)
    exported = set(load_file(export_dir / "adapter_model.safetensors"))
    tensors = {
        k: v
        for k, v in checkpoint.peft_tensors(tags, dict.fromkeys(_modules(tags), True)).items()
        if k in exported
    }
    assert set(tensors) == exported
    save_file(tensors, tag_dir / "adapter_model.safetensors")
    config = json.loads((export_dir / "adapter_config.json").read_text())
    (tag_dir / "adapter_config.json").write_text(json.dumps(config))
    where: dict[int, tuple[str, int]] = {}
    for pname, param in _lora_params(load_peft(model_dir, tag_dir)):
        flat = param.detach().numpy().reshape(-1)
        for pos in np.flatnonzero(flat):
            tag = int(flat[pos])
            assert tag not in where, f"entry {tag} placed twice ({where[tag]}, {pname})"
            where[tag] = (pname, int(pos))
    out: dict[str, tuple[str, Any]] = {}
    for name, tag in tags.items():
        hits = [where.get(int(x)) for x in tag.reshape(-1)]
        if all(h is None for h in hits):
            continue  # an untargeted module
        assert all(h is not None for h in hits), f"{name}: only part of it reached PEFT"
        pnames = {h[0] for h in hits if h is not None}
        assert len(pnames) == 1, f"{name} is spread over {pnames}"
        out[name] = (pnames.pop(), np.array([h[1] for h in hits if h is not None]))
    return out


def _modules(factors: dict[str, np.ndarray]) -> set[str]:
    return {name.rsplit(".lora.", 1)[0] for name in factors}


def torch_lora_grads(t: Trained, export_dir: Path) -> dict[str, Any]:
    """Gradients of ``Σ -w·logp(target)`` w.r.t. every PEFT LoRA parameter, by autograd."""
    model = load_peft(t.model_dir, export_dir, trainable=True)
    logp = torch.log_softmax(hf_logits(model, t), dim=-1)
    targets = torch.from_numpy(t.ids[:, 1:])
    picked = torch.gather(logp, -1, targets[..., None])[..., 0]
    loss = -(torch.from_numpy(t.weights) * picked).sum()
    loss.backward()
    grads = {}
    for name, param in _lora_params(model):
        g = param.grad
        grads[name] = (torch.zeros_like(param) if g is None else g).detach().numpy().reshape(-1)
    return grads


def test_lora_gradients_match_torch_autograd(trained: Trained, tmp_path: Path) -> None:
    for adapter in trained.adapters:
        _check_gradients(trained, adapter, tmp_path / str(adapter.slot))


def _check_gradients(trained: Trained, adapter: Adapter, tmp_path: Path) -> None:
    export_dir, tag_dir = tmp_path / "peft", tmp_path / "tags"
    tag_dir.mkdir(parents=True)
    trained.engine.export_peft(adapter.slot, export_dir)
    where = peft_locations(trained.model_dir, adapter.grads, export_dir, tag_dir)
    ref = torch_lora_grads(trained, export_dir)
    assert where, "no LoRA factor reached PEFT"
    errors = {}
    for name, g in adapter.grads.items():
        if name not in where:
            # An untargeted module has scaling 0 in this slot: its factors get no gradient.
            assert not np.any(g), f"{name}: untargeted but has a gradient"
            continue
        pname, positions = where[name]
        theirs = ref[pname][positions].reshape(g.shape)
        assert np.any(theirs), f"{name}: zero reference gradient, the test would be vacuous"
        errors[name] = rel_error(g, theirs)
    worst = max(errors, key=errors.__getitem__)
    print(
        f"{trained.model_dir.name} slot {adapter.slot}: {len(errors)} factors, "
        f"worst gradient rel error {errors[worst]:.2e} ({worst})"
    )
    assert all(err <= TOL for err in errors.values()), errors
