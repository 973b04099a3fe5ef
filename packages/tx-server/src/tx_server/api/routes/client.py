"""Client bootstrap: feature flags (spec §2.1) and the server's supported models (§6.13)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from tx_server.api.deps import StateDep, authenticate
from tx_types import (
    ClientConfigResponse,
    ClientDynamicConfigResponse,
    GetServerCapabilitiesResponse,
    SupportedModel,
)

router = APIRouter(tags=["client"], dependencies=[Depends(authenticate)])


@router.post("/client/config", response_model=ClientConfigResponse)
def client_config(state: StateDep) -> ClientConfigResponse:
    """Flags for the SDK: no JWT exchange; fwd/bwd chunking and zstd from ``settings.client``.

    The body (``ClientConfigRequest``, the SDK version) is not read: flags do not depend on it
    yet, and an unexpected body must never make this first call fail (spec §0 item 1).
    """
    flags = state.settings.client.model_dump()
    return ClientConfigResponse(pjwt_auth_enabled=False, **flags)


@router.post("/client/dynamic_config", response_model=ClientDynamicConfigResponse)
def client_dynamic_config() -> ClientDynamicConfigResponse:
    """Periodically refreshed flags: all defaults (no server-side sample cancellation)."""
    return ClientDynamicConfigResponse()


@router.get("/get_server_capabilities", response_model=GetServerCapabilitiesResponse)
def get_server_capabilities(state: StateDep) -> GetServerCapabilitiesResponse:
    """The configured base models, each trainable and sampleable up to ``max_seq_len``."""
    max_len = state.settings.engine.max_seq_len
    models = [
        SupportedModel(model_name=name, max_context_length=max_len, trainable=True, sampleable=True)
        for name in state.settings.base_models
    ]
    return GetServerCapabilitiesResponse(supported_models=models)
