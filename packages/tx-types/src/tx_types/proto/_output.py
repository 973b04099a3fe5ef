"""``ForwardBackwardOutput``: server-side encoding and client-side decoding.

Layout (spec §5.3): one ``ArrayRecord`` per run of consecutive datums whose fields share dtype
and trailing shape (normally the whole batch), one ``BatchedTensor`` per field holding every
datum's flattened array back to back with BYTE offsets. A datum whose ``logprobs`` is ``[N, K]``
next to one with ``[N]`` therefore starts a new record: the SDK concatenates the per-field datum
lists of all records in order, so contiguous runs keep datum order intact.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from google.protobuf.message import DecodeError
from pydantic import ValidationError

from tx_types import ForwardBackwardOutput, TensorData
from tx_types.proto import tinker_public_pb2 as pb
from tx_types.proto._arrays import AnyArray, batched_tensor, split_batched
from tx_types.proto._tensors import tensor_data_from_numpy, tensor_data_to_numpy
from tx_types.proto.errors import ProtoDecodeError, invalid

__all__ = ["decode_forward_backward_output", "encode_forward_backward_output"]

# Per datum: ((field name, dtype, trailing shape), ...) in sorted field order.
_Signature = tuple[tuple[str, str, tuple[int, ...]], ...]


def encode_forward_backward_output(output: ForwardBackwardOutput) -> bytes:
    """Serialize ``output`` for ``retrieve_future`` (``Content-Type: application/x-protobuf``).

    Every datum must carry the same field names (the SDK indexes each field's datum list by
    datum position), and every output tensor must be dense. Violations are server bugs and
    raise ``ValueError``.
    """
    msg = pb.ForwardBackwardOutput(loss_fn_output_type=output.loss_fn_output_type)
    for key, value in output.metrics.items():
        msg.metrics[key] = float(value)
    arrays, signatures = _datum_arrays(output.loss_fn_outputs)
    start = 0
    for end in range(1, len(arrays) + 1):
        if end < len(arrays) and signatures[end] == signatures[start]:
            continue
        record = msg.loss_fn_outputs.add(
            type_tag=output.loss_fn_output_type, num_datums=end - start
        )
        for name, wire, trailing in signatures[start]:
            per_datum = [arrays[i][name] for i in range(start, end)]
            record.fields[name].CopyFrom(batched_tensor(per_datum, wire, trailing))
        start = end
    body: bytes = msg.SerializeToString()
    return body


def _datum_arrays(
    outputs: Sequence[dict[str, TensorData]],
) -> tuple[list[dict[str, AnyArray]], list[_Signature]]:
    names = sorted(outputs[0]) if outputs else []
    arrays: list[dict[str, AnyArray]] = []
    signatures: list[_Signature] = []
    for i, datum in enumerate(outputs):
        if sorted(datum) != names:
            raise ValueError(
                f"loss_fn_outputs[{i}] has fields {sorted(datum)} but loss_fn_outputs[0] has "
                f"{names}: every datum must carry the same fields"
            )
        # A 0-d value travels as one element; the SDK rebuilds it as shape [1].
        arrs = {name: np.atleast_1d(tensor_data_to_numpy(datum[name])) for name in names}
        arrays.append(arrs)
        signatures.append(
            tuple((name, datum[name].dtype, tuple(arrs[name].shape[1:])) for name in names)
        )
    return arrays, signatures


def decode_forward_backward_output(body: bytes) -> ForwardBackwardOutput:
    """Parse a protobuf ``ForwardBackwardOutput`` the way the SDK 0.38.0 client does."""
    msg = pb.ForwardBackwardOutput()
    try:
        msg.ParseFromString(body)
    except DecodeError as exc:
        raise ProtoDecodeError(
            f"ForwardBackwardOutput: not a valid protobuf message ({exc})"
        ) from None
    metrics = {key: float(value) for key, value in msg.metrics.items()}
    if not msg.loss_fn_outputs:
        return _output(msg.loss_fn_output_type or "ArrayRecord", [], metrics)
    per_field: dict[str, list[TensorData]] = {}
    for r, record in enumerate(msg.loss_fn_outputs):
        for name, bt in record.fields.items():
            what = f"loss_fn_outputs[{r}].fields[{name!r}]"
            chunks, wire = split_batched(bt, what, record.num_datums or None)
            per_field.setdefault(name, []).extend(tensor_data_from_numpy(a, wire) for a in chunks)
    num_datums = sum(record.num_datums for record in msg.loss_fn_outputs)
    if num_datums == 0 and per_field:
        num_datums = len(next(iter(per_field.values())))
    for name, datums in per_field.items():
        if len(datums) != num_datums:
            raise ProtoDecodeError(
                f"ForwardBackwardOutput field {name!r}: {len(datums)} datums, expected {num_datums}"
            )
    outputs = [{name: datums[i] for name, datums in per_field.items()} for i in range(num_datums)]
    # The SDK keeps only the bare class name of e.g. "module:ArrayRecord".
    return _output(msg.loss_fn_output_type.rsplit(":", 1)[-1], outputs, metrics)


def _output(
    output_type: str, outputs: list[dict[str, TensorData]], metrics: dict[str, float]
) -> ForwardBackwardOutput:
    try:
        return ForwardBackwardOutput(
            loss_fn_output_type=output_type, loss_fn_outputs=outputs, metrics=metrics
        )
    except ValidationError as exc:
        raise invalid("ForwardBackwardOutput", exc) from None
