"""Llama 3 (``LlamaForCausalLM``): config, decoder blocks and the causal LM.

The blocks here are the shared decoder stack: Qwen3 reuses them with q/k-norm switched on and
Qwen3-MoE swaps the MLP for the expert layer through :meth:`LlamaForCausalLM.make_mlp`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from tx_engine.layers.attention import Attention, KVCache, LayerKV
from tx_engine.layers.linear import Embed, LoRALinear, LoRASpec
from tx_engine.layers.mlp import MLP
from tx_engine.layers.norm import RMSNorm
from tx_engine.layers.rope import rope_cos_sin, rope_inv_freq
from tx_engine.models.config_utils import require, rope_settings


@dataclass(frozen=True)
class LlamaConfig:
    """The fields of HF ``LlamaConfig`` the forward pass needs; hashable (jit-static safe)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] | None
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    hf_config: Mapping[str, Any] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

    qk_norm: ClassVar[bool] = False

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> LlamaConfig:
        return cls(**cls._base_fields(d))

    @classmethod
    def _base_fields(cls, d: Mapping[str, Any]) -> dict[str, Any]:
        hidden = require(d, "hidden_size", int)
        heads = require(d, "num_attention_heads", int)
        theta, scaling = rope_settings(d)
        head_dim = int(d.get("head_dim") or hidden // heads)
        rope_inv_freq(head_dim, theta, dict(scaling) if scaling else None)  # validate early
        return {
            "vocab_size": require(d, "vocab_size", int),
            "hidden_size": hidden,
            "intermediate_size": require(d, "intermediate_size", int),
            "num_hidden_layers": require(d, "num_hidden_layers", int),
            "num_attention_heads": heads,
            "num_key_value_heads": int(d.get("num_key_value_heads") or heads),
            "head_dim": head_dim,
            "rms_norm_eps": float(d.get("rms_norm_eps", 1e-6)),
            "rope_theta": theta,
            "rope_scaling": scaling,
            "tie_word_embeddings": bool(d.get("tie_word_embeddings", False)),
            "attention_bias": bool(d.get("attention_bias", False)),
            "mlp_bias": bool(d.get("mlp_bias", False)),
            "hf_config": dict(d),
        }

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling is not None else None


class DecoderLayer(nnx.Module):
    """Pre-norm block: ``h += attn(norm(h)); h += mlp(norm(h))``."""

    def __init__(
        self,
        cfg: LlamaConfig,
        mlp: nnx.Module,
        *,
        lora: LoRASpec,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ) -> None:
        nkw: dict[str, Any] = {
            "eps": cfg.rms_norm_eps,
            "dtype": dtype,
            "param_dtype": param_dtype,
            "rngs": rngs,
        }
        self.input_layernorm = RMSNorm(cfg.hidden_size, **nkw)
        self.self_attn = Attention(
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            qk_norm_eps=cfg.rms_norm_eps if cfg.qk_norm else None,
            use_bias=cfg.attention_bias,
            lora=lora,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **nkw)
        self.mlp = mlp

    def __call__(
        self,
        h_btd: jax.Array,
        cos_sin: tuple[jax.Array, jax.Array],
        mask_bt: jax.Array,
        adapter_indices_b: jax.Array,
        kv: LayerKV | None,
    ) -> tuple[jax.Array, LayerKV | None]:
        attn_btd, kv = self.self_attn(
            self.input_layernorm(h_btd), cos_sin, mask_bt, adapter_indices_b, kv
        )
        h_btd = h_btd + attn_btd
        h_btd = h_btd + self.mlp(self.post_attention_layernorm(h_btd), adapter_indices_b)
        return h_btd, kv


def _run_layer(
    layer: DecoderLayer,
    h_btd: jax.Array,
    cos_sin: tuple[jax.Array, jax.Array],
    mask_bt: jax.Array,
    adapter_indices_b: jax.Array,
    kv: LayerKV | None,
) -> tuple[jax.Array, LayerKV | None]:
    return layer(h_btd, cos_sin, mask_bt, adapter_indices_b, kv)


def _remat_layer(
    layer: DecoderLayer,
    h_btd: jax.Array,
    cos_sin: tuple[jax.Array, jax.Array],
    mask_bt: jax.Array,
    adapter_indices_b: jax.Array,
    kv: LayerKV | None,
) -> tuple[jax.Array, LayerKV | None]:
    """:func:`_run_layer` recomputed in the backward pass, as a pure function of the layer state.

    ``jax.checkpoint`` over ``split``/``merge`` rather than ``nnx.remat``: the latter tries to
    write the layer's variables back after the call, which fails ("Cannot mutate Param from a
    different trace level") when the model was merged inside ``jax.jit`` / ``jax.grad`` from
    traced states, as every program of ``step.py`` does. The layer never mutates itself, so
    nothing needs writing back.
    """
    graphdef, state = nnx.split(layer)

    def pure(
        state: Any, h: jax.Array, cs: tuple[jax.Array, jax.Array], m: jax.Array, a: jax.Array
    ) -> tuple[jax.Array, LayerKV | None]:
        return _run_layer(nnx.merge(graphdef, state), h, cs, m, a, kv)

    out: tuple[jax.Array, LayerKV | None] = jax.checkpoint(pure)(
        state, h_btd, cos_sin, mask_bt, adapter_indices_b
    )
    return out


class LlamaModel(nnx.Module):
    """HF ``model``: ``embed_tokens``, ``layers``, ``norm``."""

    def __init__(
        self,
        cfg: LlamaConfig,
        make_mlp: Callable[..., nnx.Module],
        *,
        lora: LoRASpec,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        remat: bool,
        rngs: nnx.Rngs,
    ) -> None:
        self.cfg = cfg
        self.remat = remat
        kw: dict[str, Any] = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, **kw)
        self.layers = nnx.List(
            [
                DecoderLayer(cfg, make_mlp(i, lora=lora, **kw), lora=lora, **kw)
                for i in range(cfg.num_hidden_layers)
            ]
        )
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)

    def __call__(
        self,
        input_ids_bt: jax.Array,
        positions_bt: jax.Array,
        mask_bt: jax.Array,
        adapter_indices_b: jax.Array,
        kv_cache: KVCache | None,
    ) -> tuple[jax.Array, KVCache | None]:
        inv_freq = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling_dict)
        cos_sin = rope_cos_sin(positions_bt, inv_freq)
        run = _remat_layer if self.remat and kv_cache is None else _run_layer
        h_btd = self.embed_tokens(input_ids_bt)
        new_k, new_v, kv_out = [], [], None
        for i, layer in enumerate(self.layers):
            kv_in = None
            if kv_cache is not None:
                kv_in = LayerKV(
                    kv_cache.k_lbskh[i], kv_cache.v_lbskh[i], kv_cache.mask_bs, kv_cache.index
                )
            h_btd, kv_out = run(layer, h_btd, cos_sin, mask_bt, adapter_indices_b, kv_in)
            if kv_out is not None:
                new_k.append(kv_out.k_bskh)
                new_v.append(kv_out.v_bskh)
        new_cache = None
        if kv_cache is not None and kv_out is not None:
            new_cache = KVCache(jnp.stack(new_k), jnp.stack(new_v), kv_out.mask_bs, kv_out.index)
        return self.norm(h_btd), new_cache


class LlamaForCausalLM(nnx.Module):
    """Causal LM with multi-tenant LoRA; see :mod:`tx_engine.models` for the call API."""

    config_class: ClassVar[type[LlamaConfig]] = LlamaConfig

    def __init__(
        self,
        config: LlamaConfig,
        *,
        lora: LoRASpec,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        remat: bool = False,
        rngs: nnx.Rngs,
    ) -> None:
        self.config = config
        self.dtype = dtype
        kw: dict[str, Any] = {
            "lora": lora,
            "dtype": dtype,
            "param_dtype": param_dtype,
            "rngs": rngs,
        }
        self.model = LlamaModel(config, self.make_mlp, remat=remat, **kw)
        self.lm_head = LoRALinear(
            config.hidden_size,
            config.vocab_size,
            axes=("embed", "vocab"),
            group="unembed",
            has_weight=not config.tie_word_embeddings,
            **kw,
        )

    def make_mlp(self, layer_idx: int, **kw: Any) -> nnx.Module:
        """The MLP of layer ``layer_idx``; Qwen3-MoE overrides this to place expert layers."""
        cfg = self.config
        return MLP(cfg.hidden_size, cfg.intermediate_size, use_bias=cfg.mlp_bias, **kw)

    def __call__(
        self,
        input_ids_bt: jax.Array,
        *,
        positions_bt: jax.Array,
        attention_mask_bt: jax.Array,
        adapter_indices_b: jax.Array,
        kv_cache: KVCache | None = None,
    ) -> Any:
        """Final hidden states ``[B, T, D]``; ``(hidden, new_cache)`` when ``kv_cache`` is given."""
        hidden_btd, new_cache = self.model(
            input_ids_bt,
            positions_bt,
            attention_mask_bt.astype(bool),
            adapter_indices_b.astype(jnp.int32),
            kv_cache,
        )
        return hidden_btd if kv_cache is None else (hidden_btd, new_cache)

    def compute_logits(self, hidden_btd: jax.Array, adapter_indices_b: jax.Array) -> jax.Array:
        """``lm_head`` (with LoRA; tied to ``embed_tokens`` if configured) → float32 ``[B,T,V]``."""
        tied = self.model.embed_tokens.weight[...].T if self.config.tie_word_embeddings else None
        logits_btv = self.lm_head(hidden_btd, adapter_indices_b.astype(jnp.int32), weight_df=tied)
        return logits_btv.astype(jnp.float32)
