"""Tokenizer loading (spec §8); ``transformers`` is imported only when a tokenizer is asked for."""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["load_tokenizer", "tokenizer_id_for"]

_LLAMA3_TOKENIZER = "thinkingmachineslabinc/meta-llama-3-instruct-tokenizer"


def tokenizer_id_for(model_name: str, tokenizer_id: str | None = None) -> str:
    """The SDK's resolution: an explicit id wins; else Llama-3 → TML's copy, ``a/b/c`` → ``a/b``."""
    if tokenizer_id:
        return tokenizer_id.split(":", 1)[0]
    name = model_name.split(":", 1)[0]
    if name.startswith("meta-llama/Llama-3"):
        return _LLAMA3_TOKENIZER
    parts = name.split("/")
    if len(parts) == 3:
        return "/".join(parts[:2])
    return name


@functools.lru_cache(maxsize=16)
def load_tokenizer(tokenizer_id: str) -> Any:
    """``AutoTokenizer.from_pretrained(tokenizer_id)``, cached per id."""
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("get_tokenizer() needs `transformers`: pip install transformers") from exc
    return AutoTokenizer.from_pretrained(tokenizer_id, use_fast=True)
