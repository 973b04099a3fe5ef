"""Bootstrap and server-description bodies: client config, capabilities, health, auth.

``POST /api/v1/client/config`` is the very first call of every SDK client (404 is fatal), so the
server must answer it; ``ClientConfigResponse()`` with the defaults of spec §2.1 is a correct
answer. The defaults matter: a client that omits a flag behaves as documented here.
"""

from __future__ import annotations

from typing import Literal

from ._base import WireModel

__all__ = [
    "AuthTokenResponse",
    "ClientConfigRequest",
    "ClientConfigResponse",
    "ClientDynamicConfigResponse",
    "GetServerCapabilitiesResponse",
    "HealthResponse",
    "SupportedModel",
    "WhoamiResponse",
]


class ClientConfigRequest(WireModel):
    """Body of ``client/config`` and ``client/dynamic_config``."""

    sdk_version: str


class ClientConfigResponse(WireModel):
    """Feature flags for a client (all optional; unknown keys are ignored by the SDK)."""

    pjwt_auth_enabled: bool = False
    credential_default_source: str = "api_key"
    sample_dispatch_bytes_semaphore_size: int = 10 * 1024 * 1024
    inflight_response_bytes_semaphore_size: int = 50 * 1024 * 1024
    parallel_fwdbwd_chunks: bool = True
    proto_compress_fwdbwd: bool = False
    fwdbwd_max_chunk_len: int = 1024
    fwdbwd_max_chunk_bytes_count: int = 5_000_000
    fwdbwd_dispatch_bytes_semaphore_size: int = 50_000_000
    billing_exception_max_pause_duration_sec: int = 3600
    sample_no_retries: bool = False
    sample_enable_stuck_detection: bool = True
    sample_max_concurrent_requests: int = 2000
    use_pyqwest_transport: bool = True
    sample_use_retrieve_futures: bool = False
    custom_loss_server_side: bool = False
    sample_join_sampling_session: bool = False


class ClientDynamicConfigResponse(WireModel):
    """Flags re-fetched every ``max(refresh_interval_sec, 10)`` s (404 = defaults)."""

    refresh_interval_sec: int = 300
    sample_cancel_enabled: bool = False
    sample_cancel_max_batch_size: int = 64


class SupportedModel(WireModel):
    model_name: str | None = None
    max_context_length: int | None = None
    trainable: bool | None = None
    sampleable: bool | None = None


class GetServerCapabilitiesResponse(WireModel):
    """Informational (the SDK never checks ``base_model`` against it)."""

    supported_models: list[SupportedModel]


class HealthResponse(WireModel):
    status: Literal["ok"] = "ok"


class AuthTokenResponse(WireModel):
    """``POST /api/v1/auth/token`` (JWT mode only)."""

    jwt: str


class WhoamiResponse(WireModel):
    user_urn: str
    org_urn: str
    email: str | None = None
