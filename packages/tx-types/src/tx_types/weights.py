"""Saving, loading, copying and describing weights.

Checkpoint *names* in save requests (``path``) must match ``[A-Za-z0-9._-]+`` (they become
directory names); *paths* in load/copy/info requests must follow the ``tinker://`` grammar.
Both are checked here so a bad value is a validation error naming the field.

``LoadWeightsRequest`` has two addressing modes (spec §4.1/§4.2): ``model_id`` (+ ``seq_id``)
loads into an existing model; ``session_id`` + ``model_seq_id`` creates the model from the
checkpoint ("create-via-load"). Exactly one mode must be used.

The ``*ResponseInternal`` variants are what the futures actually return (fields optional, one
of them set depending on the request); the public variants are what the SDK hands to users.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator

from ._base import Int32, Int64, ModelID, WireModel
from .optimizer import AdamOptimizerConfig, OptimizerConfig
from .paths import ParsedCheckpointTinkerPath, validate_checkpoint_name
from .sampling import SamplingClientKind

__all__ = [
    "CheckpointName",
    "CopyWeightsRequest",
    "CopyWeightsResponse",
    "ExternalWeightsUrlsResponse",
    "LoadWeightsRequest",
    "LoadWeightsResponse",
    "SaveWeightsExternalRequest",
    "SaveWeightsExternalResponse",
    "SaveWeightsExternalResponseInternal",
    "SaveWeightsForSamplerRequest",
    "SaveWeightsForSamplerResponse",
    "SaveWeightsForSamplerResponseInternal",
    "SaveWeightsRequest",
    "SaveWeightsResponse",
    "SetCheckpointTtlRequest",
    "TinkerPath",
    "WeightsInfoRequest",
    "WeightsInfoResponse",
]


def _check_tinker_path(value: str) -> str:
    ParsedCheckpointTinkerPath.from_tinker_path(value)
    return value


CheckpointName = Annotated[str, AfterValidator(validate_checkpoint_name)]
"""A checkpoint name as given to a save call (``[A-Za-z0-9._-]+``)."""

TinkerPath = Annotated[str, AfterValidator(_check_tinker_path)]
"""A full ``tinker://{run}/{kind}/{name}`` path."""


class SaveWeightsRequest(WireModel):
    """``save_state``: weights *and* optimizer state under ``tinker://{model}/weights/{path}``."""

    model_id: ModelID
    path: CheckpointName | None = None
    seq_id: Int64 | None = None
    ttl_seconds: int | None = None
    overwrite: bool = False
    user_metadata: dict[str, str] | None = None
    type: Literal["save_weights"] = "save_weights"


class SaveWeightsResponse(WireModel):
    path: str
    type: Literal["save_weights"] | None = None


class SaveWeightsForSamplerRequest(WireModel):
    """Named (``path``) → a sampler checkpoint; unnamed (``sampling_session_seq_id``) → a session."""

    model_id: ModelID
    path: CheckpointName | None = None
    sampling_session_seq_id: Int32 | None = None
    kind: SamplingClientKind = "snapshot"
    seq_id: Int64 | None = None
    ttl_seconds: int | None = None
    user_metadata: dict[str, str] | None = None
    type: Literal["save_weights_for_sampler"] = "save_weights_for_sampler"

    @model_validator(mode="after")
    def _named_or_session(self) -> SaveWeightsForSamplerRequest:
        if self.path is None and self.sampling_session_seq_id is None:
            raise ValueError("one of path or sampling_session_seq_id is required")
        return self


class SaveWeightsForSamplerResponseInternal(WireModel):
    """Future result: ``path`` for a named save, ``sampling_session_id`` for an unnamed one."""

    path: str | None = None
    sampling_session_id: str | None = None
    type: Literal["save_weights_for_sampler"] | None = None


class SaveWeightsForSamplerResponse(WireModel):
    path: str
    type: Literal["save_weights_for_sampler"] | None = None


class SaveWeightsExternalRequest(WireModel):
    """Export Hugging Face-format weights under ``tinker://{model}/external_weights/{path}``."""

    model_id: ModelID
    path: CheckpointName
    seq_id: Int64 | None = None
    ttl_seconds: int | None = None
    age_encryption_recipients: Annotated[list[str], Field(max_length=10)] | None = None
    type: Literal["save_weights_external"] = "save_weights_external"


class SaveWeightsExternalResponseInternal(WireModel):
    path: str | None = None
    size_bytes: int | None = None
    type: Literal["save_weights_external"] | None = None


class SaveWeightsExternalResponse(WireModel):
    path: str
    type: Literal["save_weights_external"] | None = None


class LoadWeightsRequest(WireModel):
    """Load a ``tinker://`` checkpoint into a model, or create a model from it."""

    model_id: ModelID | None = None
    seq_id: Int64 | None = None
    session_id: str | None = None
    model_seq_id: Int32 | None = None
    base_model: str | None = None
    user_metadata: dict[str, Any] | None = None
    path: TinkerPath
    optimizer: bool
    optimizer_config: OptimizerConfig | None = None
    weights_access_token: str | None = None
    type: Literal["load_weights"] = "load_weights"

    @model_validator(mode="after")
    def _one_addressing_mode(self) -> LoadWeightsRequest:
        if (self.model_id is None) == (self.session_id is None):
            raise ValueError(
                "set exactly one of model_id (load into a model) or session_id "
                "(create a model from the checkpoint)"
            )
        if self.session_id is not None and self.model_seq_id is None:
            raise ValueError("model_seq_id is required with session_id")
        return self

    @property
    def creates_model(self) -> bool:
        """True in create-via-load mode (the model id is ``{session_id}:train:{model_seq_id}``)."""
        return self.session_id is not None


class LoadWeightsResponse(WireModel):
    path: str | None = None
    model_id: str | None = None
    type: Literal["load_weights"] | None = None


class CopyWeightsRequest(WireModel):
    """Copy a checkpoint to another project/session (synchronous, not a future)."""

    session_id: str | None = None
    model_seq_id: Int32 | None = None
    destination_project_id: str | None = None
    source_path: TinkerPath
    ttl_seconds: int | None = None
    weights_access_token: str | None = None


class CopyWeightsResponse(WireModel):
    tinker_path: str


class WeightsInfoRequest(WireModel):
    """``POST /api/v1/weights_info`` body (hand-built by the SDK, no SDK type)."""

    tinker_path: TinkerPath


class WeightsInfoResponse(WireModel):
    """What is needed to load a checkpoint: base model, LoRA layout, optimizer."""

    base_model: str
    optimizer_config: OptimizerConfig = AdamOptimizerConfig()
    is_lora: bool
    lora_rank: int | None = None
    train_unembed: bool | None = None
    train_mlp: bool | None = None
    train_attn: bool | None = None


class SetCheckpointTtlRequest(WireModel):
    """``PUT .../checkpoints/{kind}/{name}/ttl`` body; null removes the expiry."""

    ttl_seconds: int | None = None


class ExternalWeightsUrlsResponse(WireModel):
    urls: dict[str, str]
    """Signed URL per file path relative to the checkpoint root."""
    expires: datetime
