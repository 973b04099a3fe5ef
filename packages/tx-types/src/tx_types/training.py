"""Training-model lifecycle and the forward/backward pass.

``create_model`` → ``get_info`` → ``forward_backward`` (protobuf on the wire; these models are
what the codec decodes into) → ``optim_step`` (see ``optimizer.py``). ``ForwardRequest`` is the
``forward_only=true`` form of the same endpoint.

``ForwardBackwardOutput.metrics`` keys must be ``name:reduction`` with exactly one colon: the
SDK crashes merging chunk results otherwise (spec §6.6), so the type refuses anything else.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from ._base import FiniteFloat, Int32, Int64, ModelID, WireModel
from .datum import Datum, LossFnOutput, LossFnType
from .optimizer import AdamOptimizerConfig, OptimizerConfig

__all__ = [
    "CreateModelRequest",
    "CreateModelResponse",
    "ForwardBackwardInput",
    "ForwardBackwardOutput",
    "ForwardBackwardRequest",
    "ForwardRequest",
    "GetInfoRequest",
    "GetInfoResponse",
    "LoraConfig",
    "ModelData",
    "UnloadModelRequest",
    "UnloadModelResponse",
]


class LoraConfig(WireModel):
    """Which layers get LoRA adapters, and their rank (alpha is a server choice)."""

    rank: Annotated[int, Field(ge=1)]
    seed: int | None = None
    """Adapter initialisation seed; absent means random."""
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class CreateModelRequest(WireModel):
    """``POST /api/v1/create_model`` → future of ``CreateModelResponse``."""

    session_id: str
    model_seq_id: Annotated[Int32, Field(ge=0)]
    base_model: str
    user_metadata: dict[str, Any] | None = None
    lora_config: LoraConfig | None = None
    optimizer_config: OptimizerConfig = AdamOptimizerConfig()
    type: Literal["create_model"] = "create_model"


class CreateModelResponse(WireModel):
    model_id: ModelID
    type: Literal["create_model"] = "create_model"


class GetInfoRequest(WireModel):
    """``POST /api/v1/get_info``."""

    model_id: ModelID
    type: Literal["get_info"] = "get_info"


class ModelData(WireModel):
    """``model_name`` is effectively required: the SDK's ``get_tokenizer`` asserts it."""

    arch: str | None = None
    model_name: str | None = None
    tokenizer_id: str | None = None


class GetInfoResponse(WireModel):
    type: Literal["get_info"] | None = None
    model_data: ModelData
    model_id: ModelID
    optimizer_config: OptimizerConfig = AdamOptimizerConfig()
    is_lora: bool | None = None
    lora_rank: int | None = None
    model_name: str | None = None


class UnloadModelRequest(WireModel):
    model_id: ModelID
    type: Literal["unload_model"] = "unload_model"


class UnloadModelResponse(WireModel):
    model_id: ModelID
    type: Literal["unload_model"] | None = None


class ForwardBackwardInput(WireModel):
    """The batch, the loss and its config (numbers, or strings such as a custom ``loss_id``)."""

    data: Annotated[list[Datum], Field(min_length=1)]
    loss_fn: LossFnType
    loss_fn_config: dict[str, FiniteFloat | str] | None = None


class ForwardBackwardRequest(WireModel):
    """``POST /api/v1/forward_backward`` with ``forward_only=false`` (protobuf body)."""

    forward_backward_input: ForwardBackwardInput
    model_id: ModelID
    seq_id: Int64 | None = None


class ForwardRequest(WireModel):
    """The same endpoint with ``forward_only=true``: outputs and metrics, no gradients."""

    forward_input: ForwardBackwardInput
    model_id: ModelID
    seq_id: Int64 | None = None


class ForwardBackwardOutput(WireModel):
    """Per-datum outputs (``logprobs`` shaped like ``target_tokens``) and ``name:reduction`` metrics."""

    loss_fn_output_type: str
    loss_fn_outputs: list[LossFnOutput]
    metrics: dict[str, float] = Field(default_factory=dict)

    @field_validator("metrics")
    @classmethod
    def _one_colon(cls, metrics: dict[str, float]) -> dict[str, float]:
        for key in metrics:
            if key.count(":") != 1:
                raise ValueError(
                    f"metric key {key!r} must have exactly one ':' (name:reduction, e.g. loss:sum)"
                )
        return metrics
