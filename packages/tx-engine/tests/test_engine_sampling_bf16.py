"""The bf16 gap: a bfloat16 sampler's logprobs against the float32 trainer's, same LoRA weights.

At float32 the sampler's T=1 logprobs equal the trainer's within 1e-5 (test_engine_sampler).
Serving in bfloat16 (weights and activations) moves them by rounding alone; RL code that uses
sampled logprobs in importance ratios sees this as a ratio of ``exp(gap)``. Measured on the
tiny-qwen3 preset (LoRA rank 8 after two AdamW steps, 3 samples × 8 tokens at T=1): max |gap|
0.0040 nats, mean 0.0013 (jax 0.10.2, CPU). The asserted bound (:data:`BF16_GAP_BOUND`) leaves
5× headroom for other platforms and seeds while still catching a real mismatch: scoring the
same tokens without the adapter moves them by more than 0.1 nats on this model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tx_engine.config import EngineConfig
from tx_engine.engine import AdamParams, AdapterBatch, DatumArrays, TrainingEngine
from tx_engine.sampler import Sampler, SampleRequestArrays

BF16_GAP_BOUND = 0.02
PROMPT = np.array([11, 250, 37, 1999, 5, 88, 640, 12, 3, 901], np.int32)


def _engine(model_dir: Path, dtype: str) -> TrainingEngine:
    return TrainingEngine(
        model_dir, EngineConfig(max_lora_adapters=1, max_lora_rank=8, dtype=dtype)
    )


def _forward_logprobs(engine: TrainingEngine, slot: int | None, seq: np.ndarray) -> np.ndarray:
    datum = DatumArrays(seq[:-1].astype(np.int32), {"target_tokens": seq[1:].astype(np.int64)})
    return engine.forward([AdapterBatch(slot, [datum])])[0].outputs[0].logprobs


def test_bf16_sampler_logprobs_stay_near_the_float32_trainer(
    tiny_qwen3_dir: Path, tmp_path: Path
) -> None:
    trainer = _engine(tiny_qwen3_dir, "float32")
    slot = trainer.create_adapter(rank=8, seed=1)
    seq = np.random.default_rng(1).integers(5, 2000, 12)
    datum = DatumArrays(seq[:-1].astype(np.int32), {"target_tokens": seq[1:].astype(np.int64)})
    for _ in range(2):
        trainer.forward_backward([AdapterBatch(slot, [datum])])
        trainer.optim_step(slot, AdamParams(learning_rate=1e-2))
    trainer.save_adapter(slot, tmp_path / "adapter", include_optimizer=False)
    served = _engine(tiny_qwen3_dir, "bfloat16")
    served_slot = served.load_adapter(tmp_path / "adapter", with_optimizer=False)
    req = SampleRequestArrays(PROMPT, 3, max_tokens=8, seed=4, stop=[], adapter=served_slot)
    gaps = []
    for s in Sampler(served, max_cache_tokens=256, max_batch=4).sample([req])[0].sequences:
        ref = _forward_logprobs(trainer, slot, np.concatenate([PROMPT, s.tokens]))
        gaps.append(np.abs(s.logprobs - ref[len(PROMPT) - 1 :]))
    gap = np.concatenate(gaps)
    assert gap.max() < BF16_GAP_BOUND
    assert gap.max() > 0  # bf16 really was in play
    # The gap is rounding, not a mismatch: with the adapter ignored it is far larger.
    base = _forward_logprobs(trainer, None, np.concatenate([PROMPT, s.tokens]))[len(PROMPT) - 1 :]
    print(f"bf16 vs f32: max |gap| {gap.max():.4f}, mean {gap.mean():.4f}; "
          f"without adapter {np.abs(base - s.logprobs).max():.4f}")  # fmt: skip
    assert np.abs(base - s.logprobs).max() > BF16_GAP_BOUND
