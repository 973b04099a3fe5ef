"""Qwen3-MoE (``Qwen3MoeForCausalLM``): Qwen3 blocks whose MLP is a sparse expert layer.

Layer ``i`` is sparse iff ``i`` is not in ``mlp_only_layers`` and ``(i + 1) %
decoder_sparse_step == 0`` (HF's rule); the others keep a dense MLP of ``intermediate_size``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from flax import nnx

from tx_engine.layers.moe import SparseMoE
from tx_engine.models.config_utils import require
from tx_engine.models.llama import LlamaConfig
from tx_engine.models.qwen3 import Qwen3Config, Qwen3ForCausalLM


@dataclass(frozen=True)
class Qwen3MoeConfig(Qwen3Config):
    num_experts: int = 0
    num_experts_per_tok: int = 1
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    @classmethod
    def _base_fields(cls, d: Mapping[str, Any]) -> dict[str, Any]:
        fields = super()._base_fields(d)
        fields.update(
            num_experts=require(d, "num_experts", int),
            num_experts_per_tok=require(d, "num_experts_per_tok", int),
            moe_intermediate_size=require(d, "moe_intermediate_size", int),
            norm_topk_prob=bool(d.get("norm_topk_prob", False)),
            decoder_sparse_step=int(d.get("decoder_sparse_step", 1)),
            mlp_only_layers=tuple(int(i) for i in d.get("mlp_only_layers") or ()),
        )
        return fields

    def is_sparse(self, layer_idx: int) -> bool:
        return (
            layer_idx not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    config_class: ClassVar[type[LlamaConfig]] = Qwen3MoeConfig

    def make_mlp(self, layer_idx: int, **kw: Any) -> nnx.Module:
        cfg = self.config
        assert isinstance(cfg, Qwen3MoeConfig)
        if not cfg.is_sparse(layer_idx):
            return super().make_mlp(layer_idx, **kw)
        return SparseMoE(
            cfg.hidden_size,
            cfg.moe_intermediate_size,
            cfg.num_experts,
            cfg.num_experts_per_tok,
            norm_topk_prob=cfg.norm_topk_prob,
            **kw,
        )
