"""The futures protocol (spec §3): submission answers, polling bodies and poll answers.

Every work endpoint answers an ``UntypedAPIFuture`` at once; the client then polls
``retrieve_future`` and gets a pending answer (``TryAgainResponse`` or HTTP 408), a
metadata-only peek (``FutureMetadataResponse``), a failure (``RequestFailedResponse``, in
``errors.py``) or the typed result. ``request_id`` is always a string — the SDK rejects ints.
``asample`` futures MUST carry ``sample_sequence_ids`` (one per requested sample).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from ._base import ModelID, RequestID, WireModel
from .errors import RequestFailedResponse
from .optimizer import OptimStepResponse
from .training import CreateModelResponse, ForwardBackwardOutput, UnloadModelResponse
from .weights import (
    LoadWeightsResponse,
    SaveWeightsExternalResponse,
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
)

__all__ = [
    "CancelFutureRequest",
    "FutureCompletion",
    "FutureFailed",
    "FutureFinished",
    "FutureMetadataResponse",
    "FutureRetrieveRequest",
    "FutureRetrieveResponse",
    "FuturesRetrieveRequest",
    "FuturesRetrieveResponse",
    "QueueState",
    "SamplingSessionFuturesTarget",
    "TryAgainResponse",
    "UntypedAPIFuture",
]

QueueState = Literal["active", "paused_capacity", "paused_rate_limit"]


class UntypedAPIFuture(WireModel):
    """Synchronous answer of every work endpoint."""

    request_id: RequestID
    model_id: ModelID | None = None
    sample_sequence_ids: list[str] | None = None
    """asample only: one id per sample, in the order of the result's sequences."""


class FutureRetrieveRequest(WireModel):
    """``POST /api/v1/retrieve_future``."""

    request_id: RequestID
    allow_metadata_only: bool = False


class TryAgainResponse(WireModel):
    """Still pending (the SDK re-polls at once, so long-poll before sending it)."""

    type: Literal["try_again"] = "try_again"
    request_id: str
    queue_state: QueueState
    queue_state_reason: str | None = None
    """Read by the SDK from the raw body (not in its model); shown in its log line."""


class FutureMetadataResponse(WireModel):
    """Metadata-only peek: the client reserves the bytes, then polls for the payload."""

    status: Literal["complete_metadata"] = "complete_metadata"
    response_payload_size: Annotated[int, Field(ge=0)]


class CancelFutureRequest(WireModel):
    """``POST /api/v1/cancel_future`` (only with the dynamic flag ``sample_cancel_enabled``)."""

    request_id: RequestID


class FutureFinished(WireModel):
    state: Literal["finished"] = "finished"
    request_id: RequestID
    response_payload_uncompressed_size: int | None = None


class FutureFailed(WireModel):
    state: Literal["failed"] = "failed"
    request_id: RequestID


FutureCompletion = Annotated[FutureFinished | FutureFailed, Field(discriminator="state")]


class SamplingSessionFuturesTarget(WireModel):
    type: Literal["sampling_session"] = "sampling_session"
    sampling_session_id: str
    cloned_sampler_id: int = 0


class FuturesRetrieveRequest(WireModel):
    """``POST /api/v1/retrieve_futures`` (flag ``sample_use_retrieve_futures``)."""

    target: SamplingSessionFuturesTarget
    prev_cursor: int = 0
    timeout: float | None = None
    retrieved_request_ids: list[str] = Field(default_factory=list)


class FuturesRetrieveResponse(WireModel):
    completions: list[FutureCompletion]
    cursor: int


FutureRetrieveResponse = (
    TryAgainResponse
    | ForwardBackwardOutput
    | OptimStepResponse
    | SaveWeightsResponse
    | LoadWeightsResponse
    | SaveWeightsForSamplerResponse
    | SaveWeightsExternalResponse
    | CreateModelResponse
    | UnloadModelResponse
    | RequestFailedResponse
)
"""The SDK's union of poll answers; a client should dispatch on the awaited type instead."""
