"""Session status and session search (``RestClient.search_sessions``, experimental).

Tagged unions on ``type``, as the SDK declares them; kept apart from ``sessions.py`` because
they are only needed by the search/admin views.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, Field

from ._base import WireModel

__all__ = [
    "AccessibleSearchOwner",
    "ActiveSessionStatusQuery",
    "CancelledSessionStatusQuery",
    "ClientFinishedSessionStatusQuery",
    "ClientSessionFinishErrored",
    "ClientSessionFinishInterrupted",
    "ClientSessionFinishReason",
    "ClientSessionFinishReasonType",
    "ClientSessionFinishSuccess",
    "ClientSessionFinished",
    "FailedSessionStatusQuery",
    "OwnSearchOwner",
    "SearchOwner",
    "SessionActive",
    "SessionCancelled",
    "SessionFailed",
    "SessionFailedReason",
    "SessionFailedRequestReason",
    "SessionFailedSamplingSessionReason",
    "SessionFailedTrainingRunReason",
    "SessionSearchCursor",
    "SessionSearchRequest",
    "SessionSearchResponse",
    "SessionStatus",
    "SessionStatusQuery",
    "SessionSummary",
    "UserSearchOwner",
]

ClientSessionFinishReasonType = Literal["success", "errored", "interrupted"]


class SessionFailedRequestReason(WireModel):
    type: Literal["request"] = "request"
    request_id: str
    request_type: str


class SessionFailedTrainingRunReason(WireModel):
    type: Literal["training_run"] = "training_run"
    training_run_id: str


class SessionFailedSamplingSessionReason(WireModel):
    type: Literal["sampling_session"] = "sampling_session"
    sampling_session_id: str


SessionFailedReason = Annotated[
    SessionFailedRequestReason
    | SessionFailedTrainingRunReason
    | SessionFailedSamplingSessionReason,
    Field(discriminator="type"),
]


class SessionFailed(WireModel):
    type: Literal["failed"] = "failed"
    category: Literal["user", "internal"]
    reason: SessionFailedReason
    message: str


class SessionCancelled(WireModel):
    type: Literal["cancelled"] = "cancelled"
    detail: str | None = None


class ClientSessionFinishSuccess(WireModel):
    type: Literal["success"] = "success"


class ClientSessionFinishErrored(WireModel):
    type: Literal["errored"] = "errored"


class ClientSessionFinishInterrupted(WireModel):
    type: Literal["interrupted"] = "interrupted"


ClientSessionFinishReason = Annotated[
    ClientSessionFinishSuccess | ClientSessionFinishErrored | ClientSessionFinishInterrupted,
    Field(discriminator="type"),
]


class ClientSessionFinished(WireModel):
    type: Literal["client_finished"] = "client_finished"
    reason: ClientSessionFinishReason
    detail: str | None = None


class SessionActive(WireModel):
    type: Literal["active"] = "active"


SessionStatus = Annotated[
    SessionFailed | SessionCancelled | ClientSessionFinished | SessionActive,
    Field(discriminator="type"),
]


class OwnSearchOwner(WireModel):
    type: Literal["own"] = "own"


class AccessibleSearchOwner(WireModel):
    type: Literal["accessible"] = "accessible"


class UserSearchOwner(WireModel):
    type: Literal["user"] = "user"
    owner_urns: Annotated[list[str], Field(min_length=1, max_length=10)]


SearchOwner = Annotated[
    OwnSearchOwner | AccessibleSearchOwner | UserSearchOwner, Field(discriminator="type")
]


class ActiveSessionStatusQuery(WireModel):
    type: Literal["active"] = "active"


class CancelledSessionStatusQuery(WireModel):
    type: Literal["cancelled"] = "cancelled"


class FailedSessionStatusQuery(WireModel):
    type: Literal["failed"] = "failed"


class ClientFinishedSessionStatusQuery(WireModel):
    type: Literal["client_finished"] = "client_finished"
    reasons: Annotated[list[ClientSessionFinishReasonType], Field(min_length=1)] | None = None


SessionStatusQuery = Annotated[
    ActiveSessionStatusQuery
    | CancelledSessionStatusQuery
    | FailedSessionStatusQuery
    | ClientFinishedSessionStatusQuery,
    Field(discriminator="type"),
]


class SessionSearchCursor(WireModel):
    last_created_at: AwareDatetime
    last_session_id: str


class SessionSearchRequest(WireModel):
    session_id: str | None = None
    project_ids: list[str] | None = None
    user_metadata: dict[str, str] = Field(default_factory=dict)
    display_name: Annotated[str, Field(min_length=1)] | None = None
    owner: SearchOwner = OwnSearchOwner()
    statuses: Annotated[list[SessionStatusQuery], Field(min_length=1)] | None = None
    limit: Annotated[int, Field(ge=1, le=200)] = 50
    cursor: SessionSearchCursor | None = None


class SessionSummary(WireModel):
    session_id: str
    created_at: datetime
    owner: str
    project_id: str
    status: SessionStatus | None = None
    checkpoints_count: int
    display_name: str | None = None
    user_metadata: dict[str, str] | None = None
    checkpoint_storage_bytes: int | None = None


class SessionSearchResponse(WireModel):
    sessions: list[SessionSummary]
    next_cursor: SessionSearchCursor | None = None
