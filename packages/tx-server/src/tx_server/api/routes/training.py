"""Training steps: ``forward_backward`` (protobuf, also forward-only) and ``optim_step`` (§4.2).

A ``forward_backward`` body that does not decode is still answered with a future, recorded as
failed with category ``user`` and a message naming the problem: the SDK then raises
``RequestFailedError`` at once, where a 4xx would be retried or turned into a generic error.
The decoded request is stored re-encoded without compression, so the worker decodes one format.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request

from tx_server.api.deps import StateDep, TenantDep
from tx_server.api.routes.models import submit, submit_for_model
from tx_server.futures import PROTOBUF, RequestType, Submission
from tx_types import OptimStepRequest, UntypedAPIFuture
from tx_types.proto import (
    ProtoDecodeError,
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
    body = await request.body()
    try:
        decoded = decode_forward_backward_request(body, content_encoding)
    except (ProtoDecodeError, ValueError) as exc:
        message = f"forward_backward request could not be decoded: {exc}"
        bad = Submission(RequestType.FORWARD_BACKWARD, b"", PROTOBUF, failed=(message, "user"))
        return await submit(state, tenant, bad)
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
