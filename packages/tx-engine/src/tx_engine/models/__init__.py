"""Causal LMs of tx-engine (Flax NNX) with multi-tenant LoRA.

Call API (same for training and the KV-cache sampler)::

    hidden_btd = model(
        input_ids_bt,                 # int32 [B, T]
        positions_bt=positions_bt,    # int32 [B, T] rope positions (e.g. cumsum(mask) - 1)
        attention_mask_bt=mask_bt,    # bool/int [B, T], 1 = real token (left or right padding)
        adapter_indices_b=slots_b,    # int32 [B], LoRA slot per row, 0 = base model
    )                                 # -> [B, T, D] after the final norm
    hidden_btd, cache = model(..., kv_cache=cache)   # sampler: KVCache in, updated KVCache out
    logits_btv = model.compute_logits(hidden_btd, slots_b)   # float32 [B, T, V]

``compute_logits`` is separate so training code can compute target log-probs chunk by chunk
without materialising ``[B, T, V]`` at once. A tied ``lm_head`` uses ``embed_tokens`` and still
carries its own LoRA factors. ``remat=True`` at construction rematerialises each decoder layer
(``nnx.remat``) in the backward pass. No function here is jitted: ``step.py`` owns the jit
boundaries.

Architectures are chosen by HF ``config.json["architectures"][0]`` through :data:`MODEL_REGISTRY`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tx_engine.errors import ConfigError, UnsupportedArchitectureError
from tx_engine.layers.attention import KVCache
from tx_engine.models.llama import LlamaConfig, LlamaForCausalLM
from tx_engine.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from tx_engine.models.qwen3_moe import Qwen3MoeConfig, Qwen3MoeForCausalLM

MODEL_REGISTRY: Mapping[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}


def model_class_for(config_dict: Mapping[str, Any]) -> type[LlamaForCausalLM]:
    """The model class named by ``architectures`` in an HF config dict."""
    archs = config_dict.get("architectures")
    if not archs or not isinstance(archs, list):
        raise ConfigError("config.json is missing required field 'architectures'")
    if archs[0] not in MODEL_REGISTRY:
        raise UnsupportedArchitectureError(
            f"architectures[0]={archs[0]!r} is not supported; supported: {sorted(MODEL_REGISTRY)}"
        )
    return MODEL_REGISTRY[archs[0]]


__all__ = [
    "MODEL_REGISTRY",
    "KVCache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "Qwen3Config",
    "Qwen3ForCausalLM",
    "Qwen3MoeConfig",
    "Qwen3MoeForCausalLM",
    "model_class_for",
]
