"""Optimizer identity (chosen at model creation) and per-step hyper-parameters.

Why tagged unions with callable discriminators: ``AdamParams`` carries no ``type`` on the wire
while the other families do (``{"type": "dimuon", ...}``), and an ignore-extra model would
otherwise swallow a Dimuon body as Adam. No ``type`` means Adam; an unknown family is a
validation error naming the field. ``OptimStepRequest`` accepts ``optim_params``, ``adam_params``
and ``optimizer_params`` and writes ``adam_params`` / ``optimizer_params`` like the SDK.

Hyper-parameters must be finite and within the ranges torch's AdamW accepts (lr ≥ 0,
0 ≤ beta < 1, eps ≥ 0, weight_decay ≥ 0); ``grad_clip_norm`` ≤ 0 disables clipping. Each must
also fit float32 (``Float32``): the update runs in float32, where a learning rate of
1e308 would be inf and turn every weight into NaN.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    Tag,
    model_serializer,
)

from ._base import Float32, Int64, ModelID, WireModel

__all__ = [
    "AdamOptimizerConfig",
    "AdamParams",
    "DimuonOptimizerConfig",
    "DimuonParams",
    "OptimParams",
    "OptimStepRequest",
    "OptimStepResponse",
    "OptimizerConfig",
]

_Beta = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]
_NonNegative = Annotated[Float32, Field(ge=0)]


class AdamOptimizerConfig(WireModel):
    """AdamW (the default optimizer)."""

    type: Literal["adamw"] = "adamw"


class DimuonOptimizerConfig(WireModel):
    """Dimuon; a server without it rejects ``create_model`` with a user error."""

    type: Literal["dimuon"] = "dimuon"
    version: Literal[1] = 1


def _config_tag(value: Any) -> str:
    tag = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return "adamw" if tag is None else str(tag)


OptimizerConfig = Annotated[
    Annotated[AdamOptimizerConfig, Tag("adamw")] | Annotated[DimuonOptimizerConfig, Tag("dimuon")],
    Discriminator(_config_tag),
]


class AdamParams(WireModel):
    """One AdamW step (torch semantics, decoupled weight decay). Defaults of spec §6.7."""

    learning_rate: _NonNegative = 0.0001
    beta1: _Beta = 0.9
    beta2: _Beta = 0.95
    eps: _NonNegative = 1e-12
    weight_decay: _NonNegative = 0.0
    grad_clip_norm: Float32 = 0.0
    """Global-norm clipping threshold; 0 (or less) disables clipping."""


class DimuonParams(WireModel):
    """One Dimuon step."""

    type: Literal["dimuon"] = "dimuon"
    learning_rate: _NonNegative
    grad_clip_norm: Float32 = 0.0
    beta1: _Beta = 0.9


def _params_tag(value: Any) -> str:
    tag = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return "adam" if tag is None else str(tag)


OptimParams = Annotated[
    Annotated[AdamParams, Tag("adam")] | Annotated[DimuonParams, Tag("dimuon")],
    Discriminator(_params_tag),
]


class OptimStepRequest(WireModel):
    """``POST /api/v1/optim_step``: apply the accumulated gradients of ``model_id``."""

    optim_params: OptimParams = Field(
        validation_alias=AliasChoices("optim_params", "adam_params", "optimizer_params")
    )
    model_id: ModelID
    seq_id: Int64 | None = None
    type: Literal["optim_step"] = "optim_step"

    @model_serializer(mode="wrap")
    def _serialize_wire(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if "optim_params" in data:
            key = "adam_params" if isinstance(self.optim_params, AdamParams) else "optimizer_params"
            data[key] = data.pop("optim_params")
        return data


class OptimStepResponse(WireModel):
    """Result of ``optim_step`` (metrics are free-form, not reduced by the SDK)."""

    metrics: dict[str, float] | None = None
