"""Training steps: ``forward_backward`` (protobuf, also forward-only) and ``optim_step`` (§4.2).

A ``forward_backward`` body that does not decode is still answered with a future, recorded as
failed with category ``user`` and a message naming the problem: the SDK then raises
``RequestFailedError`` at once, where a 4xx would be retried or turned into a generic error.
The decoded request is stored re-encoded without compression, so the worker decodes one format.

Size limits (spec §4.2 chunking): the SDK splits a batch into requests of at most
``fwdbwd_max_chunk_len`` datums and about ``fwdbwd_max_chunk_bytes_count`` bytes, both
advertised in ``client/config``. A request over them (``max_fwdbwd_tokens``,
``max_fwdbwd_body_bytes``; see :mod:`tx_server.settings`) did not come from that chunker, and
would hold the one worker for every tenant: it fails on arrival as a ``user`` error naming the
limit, before anything is decoded into datums or stored.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request

from tx_server.api.deps import StateDep, TenantDep
from tx_server.api.routes.models import submit, submit_for_model
from tx_server.api.state import AppState
from tx_server.futures import PROTOBUF, RequestType, Submission
from tx_server.settings import Settings
from tx_types import OptimStepRequest, UntypedAPIFuture
from tx_types.proto import (
    ProtoDecodeError,
    RequestTooLargeError,
    decode_forward_backward_request,
    encode_forward_backward_request,
)

router = APIRouter(tags=["training"])


@router.post("/forward_backward", response_model=UntypedAPIFuture)
async def forward_backward(
    request: Request,
    tenant: TenantDep,
    state: StateDep,
    content_encoding: Annotated[str | None, Header(alias="Content-Encoding")] = None,
) -> UntypedAPIFuture:
    """Queue a forward/backward (or forward-only) pass over a protobuf batch."""
    settings = state.settings
    body = await _read_capped(request, settings.max_fwdbwd_body_bytes)
    try:
        if body is None:
            raise RequestTooLargeError(f"request body: over {settings.max_fwdbwd_body_bytes} bytes")
        decoded = decode_forward_backward_request(
            body,
            content_encoding,
            max_decompressed_bytes=settings.max_fwdbwd_body_bytes,
            max_datums=settings.client.fwdbwd_max_chunk_len,
            max_tokens=settings.fwdbwd_token_limit,
        )
    except RequestTooLargeError as exc:
        return await _reject(
            state, tenant, f"forward_backward request is too large: {exc}. {_limits(settings)}"
        )
    except (ProtoDecodeError, ValueError) as exc:
        return await _reject(state, tenant, f"forward_backward request could not be decoded: {exc}")
    payload = encode_forward_backward_request(
        decoded.model_id,
        decoded.seq_id,
        decoded.forward_backward_input,
        decoded.forward_only,
        compress=False,
    )
    kind = RequestType.FORWARD if decoded.forward_only else RequestType.FORWARD_BACKWARD
    submission = Submission(
        kind, payload, PROTOBUF, model_id=decoded.model_id, seq_id=decoded.seq_id
    )
    return await submit_for_model(state, tenant, submission, decoded.model_id)


def _limits(settings: Settings) -> str:
    return (
        f"This server's limits per forward_backward request: "
        f"{settings.client.fwdbwd_max_chunk_len} datums (fwdbwd_max_chunk_len, advertised in "
        f"client/config: the SDK splits a larger batch into several requests itself), "
        f"{settings.fwdbwd_token_limit} model-input tokens (max_fwdbwd_tokens), "
        f"{settings.max_fwdbwd_body_bytes} bytes of body as sent and decompressed "
        f"(max_fwdbwd_body_bytes)"
    )


async def _read_capped(request: Request, cap: int) -> bytes | None:
    """The body, or None when it is over ``cap`` bytes.

    An oversized body is still read to its end, but dropped as it arrives: answering before
    the client has sent it all would close the connection under it, which the SDK retries.
    """
    declared = request.headers.get("content-length", "")
    over = declared.isdigit() and int(declared) > cap
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        over = over or size > cap
        if not over:
            parts.append(part)
    return None if over else b"".join(parts)


async def _reject(state: AppState, tenant: str, message: str) -> UntypedAPIFuture:
    """A future failed on arrival with a ``user`` error: the SDK raises it at once, unretried."""
    bad = Submission(RequestType.FORWARD_BACKWARD, b"", PROTOBUF, failed=(message, "user"))
    return await submit(state, tenant, bad)


@router.post("/optim_step", response_model=UntypedAPIFuture)
async def optim_step(
    body: OptimStepRequest, tenant: TenantDep, state: StateDep
) -> UntypedAPIFuture:
    """Queue one AdamW step of the model on its accumulated gradients."""
    submission = Submission(
        RequestType.OPTIM_STEP,
        body.model_dump_json().encode(),
        model_id=body.model_id,
        seq_id=body.seq_id,
    )
    return await submit_for_model(state, tenant, submission, body.model_id)
