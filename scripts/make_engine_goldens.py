"""Generate the tx-engine parity goldens with transformers + torch (float32).

For each architecture: a tiny random HF config, weights drawn with NumPy from a fixed seed and
saved as ``model.safetensors`` under hub key names (per-expert keys for MoE, exactly as hub
checkpoints store them), and the logits ``transformers`` computes at float32 (eager attention)
on a few padded batches, saved as ``logits.npz``. The default test suite compares
``tx_engine.loading.load_model`` against these; ``tests/test_engine_parity_live.py`` recomputes
them live through :func:`reference_logits`.

Run (torch must never enter the workspace venv)::

    python3 -m venv /tmp/parity
    /tmp/parity/bin/pip install torch==2.13.0 transformers==5.23.0 safetensors numpy
    /tmp/parity/bin/python scripts/make_engine_goldens.py [out_dir]

Batch keys in ``logits.npz``: ``b{i}_input_ids``, ``b{i}_attention_mask``,
``b{i}_position_ids`` and ``b{i}_logits`` (float32, only positions ``>= b{i}_logits_start`` are
stored, to keep the 2k-position Llama sequence small).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "packages/tx-engine/tests/goldens"

_COMMON: dict[str, Any] = {
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# Hub-format configs (top-level rope_theta + rope_scaling), as most checkpoints ship them.
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {
        **_COMMON,
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "rope_theta": 10000.0,
        # wavelengths 2π·10000^(2i/16) span all three llama3 regimes for old_len=256:
        # < 64 unchanged, 64..256 smoothed, > 256 divided by factor.
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
    },
    "qwen3": {
        **_COMMON,
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
    },
    "qwen3_moe": {
        **_COMMON,
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [0],
    },
}


def hub_weight_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Hub key names and shapes of a Llama/Qwen3/Qwen3-MoE checkpoint."""
    d, v, h = cfg["hidden_size"], cfg["vocab_size"], cfg["head_dim"]
    nq, nk = cfg["num_attention_heads"] * h, cfg["num_key_value_heads"] * h
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, d),
        "model.norm.weight": (d,),
    }
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)}
        shapes |= {p + "self_attn.q_proj.weight": (nq, d), p + "self_attn.k_proj.weight": (nk, d)}
        shapes |= {p + "self_attn.v_proj.weight": (nk, d), p + "self_attn.o_proj.weight": (d, nq)}
        if cfg["model_type"] != "llama":
            shapes |= {p + "self_attn.q_norm.weight": (h,), p + "self_attn.k_norm.weight": (h,)}
        sparse = cfg.get("num_experts") and i not in cfg.get("mlp_only_layers", [])
        if sparse:
            f = cfg["moe_intermediate_size"]
            shapes[p + "mlp.gate.weight"] = (cfg["num_experts"], d)
            for j in range(cfg["num_experts"]):
                e = f"{p}mlp.experts.{j}."
                shapes |= {e + "gate_proj.weight": (f, d), e + "up_proj.weight": (f, d)}
                shapes[e + "down_proj.weight"] = (d, f)
        else:
            f = cfg["intermediate_size"]
            shapes |= {p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d)}
            shapes[p + "mlp.down_proj.weight"] = (d, f)
    return shapes


def random_weights(cfg: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    """Norm scales near 1, matrices N(0, 0.08²) (large enough that logits are far from flat)."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in sorted(hub_weight_shapes(cfg).items()):
        if key.endswith("norm.weight"):
            out[key] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[key] = (0.08 * rng.standard_normal(shape)).astype(np.float32)
    return out


def make_batches(arch: str, vocab: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Left-padded, right-padded and unpadded rows; Llama adds positions ≥ 2048."""
    rng = np.random.default_rng(seed + 1000)
    t = 12
    mask = np.ones((3, t), np.int64)
    mask[0, :4] = 0  # left padding
    mask[1, 9:] = 0  # right padding
    ids = rng.integers(3, vocab, size=(3, t)).astype(np.int64)
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    batches = [{"input_ids": ids, "attention_mask": mask, "position_ids": pos, "logits_start": 0}]
    if arch == "llama":
        ids2 = rng.integers(3, vocab, size=(2, 16)).astype(np.int64)
        pos2 = np.stack([np.arange(2040, 2056), np.arange(3000, 3016)])
        batches.append(
            {
                "input_ids": ids2,
                "attention_mask": np.ones_like(ids2),
                "position_ids": pos2,
                "logits_start": 0,
            }
        )
        long_t = 2112
        ids3 = rng.integers(3, vocab, size=(1, long_t)).astype(np.int64)
        batches.append(
            {
                "input_ids": ids3,
                "attention_mask": np.ones_like(ids3),
                "position_ids": np.arange(long_t)[None],
                "logits_start": long_t - 48,
            }
        )
    return batches


def reference_logits(model_dir: Path, batches: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Logits of ``transformers`` (float32, eager attention) for each batch, from ``logits_start``."""
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    # A missing key would be silently random-initialised by transformers: refuse it.
    bad = {k: v for k, v in info.items() if k != "error_msgs" and v} | (
        {"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {}
    )
    if bad:
        raise RuntimeError(f"transformers did not load {model_dir} cleanly: {bad}")
    model.eval()
    out = []
    with torch.no_grad():
        for b in batches:
            logits = model(
                input_ids=torch.from_numpy(b["input_ids"]),
                attention_mask=torch.from_numpy(b["attention_mask"]),
                position_ids=torch.from_numpy(b["position_ids"]),
            ).logits
            out.append(logits[:, int(b["logits_start"]) :].float().numpy())
    return out


def write_golden(arch: str, out_dir: Path, seed: int = 0) -> None:
    from safetensors.numpy import save_file

    cfg = CONFIGS[arch]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    save_file(
        random_weights(cfg, seed), str(out_dir / "model.safetensors"), metadata={"format": "pt"}
    )
    batches = make_batches(arch, cfg["vocab_size"], seed)
    arrays: dict[str, np.ndarray] = {}
    for i, (b, logits) in enumerate(zip(batches, reference_logits(out_dir, batches), strict=True)):
        for k, val in b.items():
            arrays[f"b{i}_{k}"] = np.asarray(val)
        arrays[f"b{i}_logits"] = logits.astype(np.float32)
    np.savez_compressed(out_dir / "logits.npz", **arrays)


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else GOLDEN_DIR
    for arch in CONFIGS:
        write_golden(arch, root / arch)
        print(f"wrote {root / arch}")


if __name__ == "__main__":
    main()
