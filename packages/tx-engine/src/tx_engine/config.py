"""Static configuration of a :class:`~tx_engine.engine.TrainingEngine`.

Everything here fixes a *shape* or a *compiled program*: the number of adapter slots and their
maximum rank size the LoRA tensors, the buckets bound how many programs get compiled, the token
budget bounds activation memory. Changing any of it means building a new engine, which is why
the dataclass is frozen; per-request knobs (learning rate, loss config) are traced values and
never live here.
"""

from __future__ import annotations

from dataclasses import dataclass

from tx_engine.errors import ConfigError

_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class EngineConfig:
    """Shapes, buckets and memory budget of one engine.

    ``seq_len_buckets`` / ``batch_buckets``: allowed padded sizes, ascending. Empty means powers
    of two from ``min_seq_len`` / 1; a size larger than the last explicit bucket is rounded up to
    a multiple of it, so no input is ever refused for length alone.
    ``tokens_per_micro_batch``: padded tokens (rows × bucketed length) of one compiled call; a
    larger request is split and its gradients summed, so memory does not grow with request size.
    2048 keeps a training step of a ~40M-parameter model under ~3 GB (activations grow ~0.5 GB
    per 1k tokens there, 8×512 tokens in one call peaked at 4.7 GB) while each matmul still
    has ≥ 2k rows, which is where CPU matmuls reach their peak: bigger buys no speed.
    ``logits_chunk_tokens``: tokens whose ``[·, V]`` logits are materialised at once when
    computing target log-probs (0 = all at once); bounds the vocabulary's share of memory.
    ``remat``: recompute activations in the backward pass (passed to the model when it supports
    it). ``mesh_*``: device-mesh sizes for :mod:`tx_engine.sharding`; all 1 means one device.
    """

    max_lora_adapters: int = 4
    max_lora_rank: int = 32
    dtype: str = "float32"
    seq_len_buckets: tuple[int, ...] = ()
    min_seq_len: int = 16
    batch_buckets: tuple[int, ...] = ()
    tokens_per_micro_batch: int = 2048
    logits_chunk_tokens: int = 2048
    remat: bool = False
    mesh_dp: int = 1
    mesh_fsdp: int = 1
    mesh_tp: int = 1
    mesh_ep: int = 1

    def __post_init__(self) -> None:
        positive = {
            "max_lora_adapters": self.max_lora_adapters,
            "max_lora_rank": self.max_lora_rank,
            "min_seq_len": self.min_seq_len,
            "tokens_per_micro_batch": self.tokens_per_micro_batch,
            "mesh_dp": self.mesh_dp,
            "mesh_fsdp": self.mesh_fsdp,
            "mesh_tp": self.mesh_tp,
            "mesh_ep": self.mesh_ep,
        }
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"EngineConfig.{name} must be a positive int, got {value!r}")
        chunk = self.logits_chunk_tokens
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
            raise ConfigError(
                f"EngineConfig.logits_chunk_tokens must be an int >= 0, got {chunk!r}"
            )
        if self.dtype not in _DTYPES:
            raise ConfigError(f"EngineConfig.dtype must be one of {_DTYPES}, got {self.dtype!r}")
        for name in ("seq_len_buckets", "batch_buckets"):
            buckets = getattr(self, name)
            if any(not isinstance(b, int) or b < 1 for b in buckets) or list(buckets) != sorted(
                set(buckets)
            ):
                raise ConfigError(
                    f"EngineConfig.{name} must be strictly ascending positive ints, got {buckets!r}"
                )

    @property
    def mesh_shape(self) -> tuple[int, int, int, int]:
        """``(dp, fsdp, tp, ep)`` in the axis order of :data:`tx_engine.sharding.MESH_AXES`."""
        return (self.mesh_dp, self.mesh_fsdp, self.mesh_tp, self.mesh_ep)
