"""Shared layers: norm, rope, attention (GQA + KV cache), MLP, MoE, embedding, LoRA linear."""
