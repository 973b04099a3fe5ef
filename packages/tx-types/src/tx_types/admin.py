"""AdminClient/CLI-only bodies: audit log, billing usage, checkpoint storage usage.

Optional for a self-hosted server (spec §4.5); typed so a server that implements them, and a
client that reads them, agree with the SDK.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field

from ._base import WireModel

__all__ = [
    "AuditLogEntry",
    "AuditLogResponse",
    "BillingEventInfo",
    "BillingUsageEvent",
    "BillingUsageResponse",
    "BillingUsageSession",
    "CheckpointBillingEvent",
    "CurrentCheckpointStorageUsageItem",
    "CurrentCheckpointStorageUsageResponse",
    "GetBillingUsageRequest",
    "GetCurrentCheckpointStorageUsageRequest",
    "SamplingPrefillBillingEvent",
    "SamplingSampleBillingEvent",
    "StorageBillingEvent",
    "TrainingBillingEvent",
]


class AuditLogEntry(WireModel):
    timestamp: datetime
    event: str
    event_details: dict[str, object] = Field(default_factory=dict)
    model_id: str | None = None
    tinker_path: str | None = None
    purpose: str | None = None


class AuditLogResponse(WireModel):
    entries: list[AuditLogEntry]


class GetBillingUsageRequest(WireModel):
    """Query parameters of ``GET /api/v1/billing/usage/events``."""

    starting_on: datetime
    ending_before: datetime


class TrainingBillingEvent(WireModel):
    type: Literal["training"] = "training"
    token_count: int


class SamplingPrefillBillingEvent(WireModel):
    type: Literal["sampling_prefill"] = "sampling_prefill"
    cached: bool
    token_count: int


class SamplingSampleBillingEvent(WireModel):
    type: Literal["sampling_sample"] = "sampling_sample"
    token_count: int


class CheckpointBillingEvent(WireModel):
    type: Literal["checkpoint"] = "checkpoint"
    count: int


class StorageBillingEvent(WireModel):
    type: Literal["storage"] = "storage"
    free: bool = False
    gigabyte_hours: float


BillingEventInfo = Annotated[
    TrainingBillingEvent
    | SamplingPrefillBillingEvent
    | SamplingSampleBillingEvent
    | CheckpointBillingEvent
    | StorageBillingEvent,
    Field(discriminator="type"),
]


class BillingUsageEvent(WireModel):
    bucket_start: datetime
    bucket_end: datetime
    base_model: str | None = None
    user_id: str | None = None
    user_name: str | None = None
    session_id: str | None = None
    project_id: str | None = None
    estimated_cost_usd: float | None = None
    effective_rate_usd_per_million_tokens: float | None = None
    effective_rate_usd_per_gigabyte_month: float | None = None
    event_info: BillingEventInfo


class BillingUsageSession(WireModel):
    user_metadata: dict[str, str] | None = None


class BillingUsageResponse(WireModel):
    data: list[BillingUsageEvent]
    sessions: dict[str, BillingUsageSession] = Field(default_factory=dict)
    cost_data_through: datetime | None = None


class GetCurrentCheckpointStorageUsageRequest(WireModel):
    """Query parameters of ``GET /api/v1/billing/usage/checkpoints/current``."""

    project_id: str | None = None


class CurrentCheckpointStorageUsageItem(WireModel):
    project_id: str | None = None
    org_user_urn: str | None = None
    user_email: str | None = None
    user_name: str | None = None
    checkpoint_count: int
    size_bytes: int
    size_gigabytes: float
    estimated_monthly_cost_usd: float | None = None


class CurrentCheckpointStorageUsageResponse(WireModel):
    effective_rate_usd_per_gigabyte_month: float | None = None
    data: list[CurrentCheckpointStorageUsageItem]
