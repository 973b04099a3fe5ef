"""The tiny-model kit: deterministic Hugging Face-layout checkpoints for offline use.

Every test, demo and benchmark gets its model here, since no machine running them can reach
the Hugging Face hub. A build is a real hub-shaped repo (hub-spelled `config.json`, safetensors
with hub key names, a locally trained tokenizer with the family's real special tokens and chat
template) filled with seeded random weights, so the code paths that load users' real
checkpoints are the ones under test.

    from tx_engine.testing import build_model, ensure_model, install_into_hf_cache
    path = ensure_model("tiny-qwen3")                      # cached per user, built once
    install_into_hf_cache(path, "Qwen/Qwen3-8B", hf_home)  # then HF_HOME=hf_home HF_HUB_OFFLINE=1
"""

from tx_engine.testing.build import (
    HUB_ALIASES,
    build_model,
    default_cache_root,
    ensure_model,
    install_hub_aliases,
)
from tx_engine.testing.hf_cache import install_into_hf_cache, repo_folder_name
from tx_engine.testing.presets import (
    FAMILIES,
    KIT_VERSION,
    PRESETS,
    Preset,
    get_preset,
    make_config,
)
from tx_engine.testing.tokenizer import build_tokenizer, special_token_ids, train_tokenizer
from tx_engine.testing.weights import count_parameters, read_all_tensors, tensor_shapes

__all__ = [
    "FAMILIES",
    "HUB_ALIASES",
    "KIT_VERSION",
    "PRESETS",
    "Preset",
    "build_model",
    "build_tokenizer",
    "count_parameters",
    "default_cache_root",
    "ensure_model",
    "get_preset",
    "install_hub_aliases",
    "install_into_hf_cache",
    "make_config",
    "read_all_tensors",
    "repo_folder_name",
    "special_token_ids",
    "tensor_shapes",
    "train_tokenizer",
]
