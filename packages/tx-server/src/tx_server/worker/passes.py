"""Decode one queued ``forward``/``forward_backward`` payload into an engine batch.

Shared by the executor (live requests) and by restart recovery, which replays the passes whose
gradients a dead worker had accumulated but not yet applied; both must build the very same
batch from the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from tx_engine.batching import AdapterBatch, DatumArrays
from tx_engine.errors import InputError
from tx_server import convert
from tx_types.proto import decode_forward_backward_request

__all__ = ["DecodedPass", "decode_pass"]


@dataclass(frozen=True)
class DecodedPass:
    """A decoded pass, not yet bound to an adapter slot."""

    model_id: str
    backward: bool
    data: list[DatumArrays]
    loss_fn: str
    loss_config: dict[str, float] | None

    def batch(self, slot: int) -> AdapterBatch:
        """The engine batch of this pass for the adapter in ``slot``."""
        return AdapterBatch(slot, self.data, self.loss_fn, self.loss_config)


def decode_pass(payload: bytes, max_seq_len: int) -> DecodedPass:
    """Decode a protobuf ``ForwardBackwardRequest``; InputError for data over ``max_seq_len``."""
    decoded = decode_forward_backward_request(payload)
    fwd = decoded.forward_backward_input
    data = convert.datum_arrays(fwd.data)
    for i, datum in enumerate(data):
        if datum.input_tokens.shape[0] > max_seq_len:
            raise InputError(
                f"data[{i}].model_input has {datum.input_tokens.shape[0]} tokens; "
                f"this server's max_seq_len is {max_seq_len}"
            )
    return DecodedPass(
        decoded.model_id,
        backward=not decoded.forward_only,
        data=data,
        loss_fn=fwd.loss_fn,
        loss_config=convert.loss_config(fwd),
    )
