"""Named tiny-model presets and the hub-spelled `config.json` each one produces.

Why hub spelling: users bring real checkpoints whose `config.json` says `rope_theta`,
`rope_scaling`, `torch_dtype`, `head_dim`, ... (not the renamed in-memory fields of newer
transformers). The engine's `from_hf` readers must be exercised on exactly that shape, so every
key below mirrors the real Qwen3-8B / Qwen3-0.6B, Llama-3.1-8B-Instruct and Qwen3-30B-A3B hub
configs; only the sizes are shrunk. Token ids are filled in from the locally trained tokenizer
(see `tokenizer.py`), so config and tokenizer always agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Family = Literal["qwen3", "llama3", "qwen3_moe"]
FAMILIES: tuple[Family, ...] = ("qwen3", "llama3", "qwen3_moe")

# Bump when anything that changes the bytes of a build changes (corpus, init, layout):
# `ensure_model` keys its cache on it, so stale builds are never reused.
KIT_VERSION = "1"


@dataclass(frozen=True)
class Preset:
    """The sizes of one tiny model; everything else comes from its family's real config."""

    name: str
    family: Family
    description: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    torch_dtype: str = "float32"


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="tiny-qwen3",
            family="qwen3",
            description="Qwen3 dense, tied embeddings, head_dim*heads != hidden (like Qwen3-0.6B)",
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            intermediate_size=256,
            vocab_size=2112,
            tie_word_embeddings=True,
        ),
        Preset(
            name="tiny-llama3",
            family="llama3",
            description="Llama 3.1 dense, untied lm_head, llama3 rope scaling (like 3.1-8B-Instruct)",
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            intermediate_size=384,
            vocab_size=2112,
            tie_word_embeddings=False,
        ),
        Preset(
            name="tiny-qwen3-moe",
            family="qwen3_moe",
            description="Qwen3-MoE, 8 experts top-2, untied lm_head (like Qwen3-30B-A3B)",
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            intermediate_size=256,
            vocab_size=2112,
            tie_word_embeddings=False,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
        ),
        Preset(
            name="small",
            family="qwen3",
            description="Qwen3 dense, ~41.6M params, for demos and benchmarks",
            hidden_size=512,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=64,
            intermediate_size=1536,
            vocab_size=32000,
            tie_word_embeddings=True,
        ),
    )
}


def get_preset(name: str) -> Preset:
    """Look a preset up by name, failing with the list of valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}"
        ) from None


def make_config(preset: Preset, token_ids: dict[str, Any]) -> dict[str, Any]:
    """The `config.json` dict, keys in the order and spelling of the family's hub config.

    `token_ids` holds `bos_token_id` and `eos_token_id` as the tokenizer assigned them.
    """
    if preset.family == "llama3":
        return _llama3_config(preset, token_ids)
    return _qwen3_config(preset, token_ids)


def _llama3_config(p: Preset, ids: dict[str, Any]) -> dict[str, Any]:
    # Llama-3.1-8B-Instruct's config.json plus Llama 3.2's explicit head_dim, with sizes shrunk.
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids["bos_token_id"],
        "eos_token_id": ids["eos_token_id"],
        "head_dim": p.head_dim,
        "hidden_act": "silu",
        "hidden_size": p.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": p.intermediate_size,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": p.num_attention_heads,
        "num_hidden_layers": p.num_hidden_layers,
        "num_key_value_heads": p.num_key_value_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": p.tie_word_embeddings,
        "torch_dtype": p.torch_dtype,
        "transformers_version": "4.43.0.dev0",
        "use_cache": True,
        "vocab_size": p.vocab_size,
    }


def _qwen3_config(p: Preset, ids: dict[str, Any]) -> dict[str, Any]:
    # Qwen3-8B (dense) / Qwen3-30B-A3B (MoE) config.json keys, alphabetical as on the hub.
    cfg: dict[str, Any] = {
        "architectures": ["Qwen3MoeForCausalLM" if p.family == "qwen3_moe" else "Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids["bos_token_id"],
        "decoder_sparse_step": 1,
        "eos_token_id": ids["eos_token_id"],
        "head_dim": p.head_dim,
        "hidden_act": "silu",
        "hidden_size": p.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": p.intermediate_size,
        "max_position_embeddings": 40960,
        "max_window_layers": p.num_hidden_layers,
        "mlp_only_layers": [],
        "model_type": p.family,
        "moe_intermediate_size": p.moe_intermediate_size,
        "norm_topk_prob": True,
        "num_attention_heads": p.num_attention_heads,
        "num_experts": p.num_experts,
        "num_experts_per_tok": p.num_experts_per_tok,
        "num_hidden_layers": p.num_hidden_layers,
        "num_key_value_heads": p.num_key_value_heads,
        "output_router_logits": False,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001,
        "sliding_window": None,
        "tie_word_embeddings": p.tie_word_embeddings,
        "torch_dtype": p.torch_dtype,
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": p.vocab_size,
    }
    if p.family == "qwen3":
        for moe_only in _MOE_ONLY_KEYS:
            del cfg[moe_only]
    return cfg


_MOE_ONLY_KEYS = (
    "decoder_sparse_step",
    "mlp_only_layers",
    "moe_intermediate_size",
    "norm_topk_prob",
    "num_experts",
    "num_experts_per_tok",
    "output_router_logits",
    "router_aux_loss_coef",
)


def make_generation_config(family: Family, token_ids: dict[str, Any]) -> dict[str, Any]:
    """`generation_config.json` as the family's instruct checkpoint ships it."""
    if family == "llama3":
        return {
            "bos_token_id": token_ids["bos_token_id"],
            "do_sample": True,
            "eos_token_id": token_ids["eos_token_id"],
            "temperature": 0.6,
            "top_p": 0.9,
            "transformers_version": "4.43.0.dev0",
        }
    return {
        "bos_token_id": token_ids["bos_token_id"],
        "do_sample": True,
        "eos_token_id": [token_ids["eos_token_id"], token_ids["pad_token_id"]],
        "pad_token_id": token_ids["pad_token_id"],
        "temperature": 0.6,
        "top_k": 20,
        "top_p": 0.95,
        "transformers_version": "4.51.0",
    }
