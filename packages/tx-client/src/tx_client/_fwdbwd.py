"""Forward/backward submission and collection: protobuf bodies, one POST per chunk.

Bodies are ``ForwardBackwardRequest`` protobufs (``forward`` is the same endpoint with
``forward_only``), zstd-compressed when ``client/config.proto_compress_fwdbwd`` is on. With
``parallel_fwdbwd_chunks`` the chunks of one call are POSTed concurrently with the first chunk
sent last, as the SDK does; the results are polled concurrently and merged in chunk order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from tx_client._errors import invalid_request
from tx_client._futures import ResultDecoder, poll_result
from tx_client._metrics import combine_outputs
from tx_client._ordering import RequestSequencer
from tx_client._session import SessionHolder
from tx_types import Datum, ForwardBackwardInput, ForwardBackwardOutput, UntypedAPIFuture
from tx_types.proto import (
    PROTOBUF_CONTENT_TYPE,
    decode_forward_backward_output,
    encode_forward_backward_request,
)

__all__ = ["FWD_BWD", "collect_chunks", "submit_chunks"]

FWD_BWD = ResultDecoder[ForwardBackwardOutput](
    "ForwardBackward", proto=decode_forward_backward_output
)


async def _post(holder: SessionHolder, body: bytes, compressed: bool) -> str:
    headers = {"Content-Type": PROTOBUF_CONTENT_TYPE}
    if compressed:
        headers["Content-Encoding"] = "zstd"
    response = await holder.transport.request(
        "POST", "forward_backward", content=body, headers=headers
    )
    return UntypedAPIFuture.model_validate_json(response.content).request_id


async def submit_chunks(
    holder: SessionHolder,
    sequencer: RequestSequencer,
    model_id: str,
    start: int,
    chunks: list[list[Datum]],
    loss_fn: str,
    loss_fn_config: Mapping[str, float | str] | None,
    forward_only: bool,
) -> list[str]:
    """POST every chunk in this call's turn (``seq_id = start + i + 1``); their request ids.

    If the bodies cannot be built (an unknown ``loss_fn``, a bad ``loss_fn_config``), the
    reserved ids are still given up in turn: otherwise every later call on the model would
    wait forever for them.
    """
    config = holder.config
    compress = bool(config and config.proto_compress_fwdbwd)
    try:
        with invalid_request("forward_backward"):
            bodies = [
                encode_forward_backward_request(
                    model_id,
                    start + i + 1,
                    ForwardBackwardInput(
                        data=chunk,
                        loss_fn=loss_fn,  # type: ignore[arg-type]
                        loss_fn_config=dict(loss_fn_config) if loss_fn_config else None,
                    ),
                    forward_only,
                    compress,
                )
                for i, chunk in enumerate(chunks)
            ]
    except BaseException:
        await sequencer.skip(start, start + len(chunks))
        raise

    async def post_all() -> list[str]:
        if config is not None and config.parallel_fwdbwd_chunks and len(bodies) > 1:
            rest = await asyncio.gather(*(_post(holder, b, compress) for b in bodies[1:]))
            return [await _post(holder, bodies[0], compress), *rest]
        return [await _post(holder, b, compress) for b in bodies]

    return await sequencer.in_turn(start, start + len(chunks), post_all)


async def collect_chunks(holder: SessionHolder, request_ids: list[str]) -> ForwardBackwardOutput:
    """Poll every chunk's result and merge them."""
    results = await asyncio.gather(
        *(poll_result(holder.transport, rid, FWD_BWD) for rid in request_ids)
    )
    return combine_outputs(results)
