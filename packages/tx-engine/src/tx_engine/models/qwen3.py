"""Qwen3 dense (``Qwen3ForCausalLM``): the Llama blocks with RMSNorm on q and k per head.

Qwen3 differs from Llama only in the per-head q/k RMSNorm (applied before rope) and in always
giving ``head_dim`` explicitly; everything else is inherited.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from tx_engine.models.config_utils import reject_if
from tx_engine.models.llama import LlamaConfig, LlamaForCausalLM


@dataclass(frozen=True)
class Qwen3Config(LlamaConfig):
    qk_norm: ClassVar[bool] = True

    @classmethod
    def _base_fields(cls, d: Mapping[str, Any]) -> dict[str, Any]:
        reject_if(d, "use_sliding_window", "sliding-window attention is not supported")
        return super()._base_fields(d)


class Qwen3ForCausalLM(LlamaForCausalLM):
    config_class: ClassVar[type[LlamaConfig]] = Qwen3Config
