"""Checkpoints and training runs as listed by the REST endpoints (``RestClient``).

Timestamps are ``datetime``; a server should send timezone-aware values (the SDK and the
cookbook compare them with aware datetimes). ``user_metadata`` of a training run is the one
given at creation, stringified — the cookbook stores its renderer name there.
"""

from __future__ import annotations

from datetime import datetime

from ._base import WireModel
from .paths import CheckpointType

__all__ = [
    "Checkpoint",
    "CheckpointsListResponse",
    "Cursor",
    "TrainingRun",
    "TrainingRunsResponse",
]


class Checkpoint(WireModel):
    checkpoint_id: str
    """``{segment}/{name}``, e.g. ``weights/step1``."""
    checkpoint_type: CheckpointType
    time: datetime
    tinker_path: str
    size_bytes: int | None = None
    public: bool = False
    user_metadata: dict[str, str] | None = None
    expires_at: datetime | None = None


class Cursor(WireModel):
    """Offset/limit pagination."""

    offset: int
    limit: int
    total_count: int


class CheckpointsListResponse(WireModel):
    checkpoints: list[Checkpoint]
    cursor: Cursor | None = None


class TrainingRun(WireModel):
    training_run_id: str
    base_model: str
    model_owner: str
    is_lora: bool
    corrupted: bool = False
    lora_rank: int | None = None
    last_request_time: datetime
    last_checkpoint: Checkpoint | None = None
    last_sampler_checkpoint: Checkpoint | None = None
    user_metadata: dict[str, str] | None = None


class TrainingRunsResponse(WireModel):
    training_runs: list[TrainingRun]
    cursor: Cursor
