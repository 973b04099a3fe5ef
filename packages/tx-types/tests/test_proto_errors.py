"""Malformed input to the decoders raises ProtoDecodeError naming the problem (→ HTTP 400)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import zstandard

from tx_types.proto import (
    ProtoDecodeError,
    decode_forward_backward_output,
    decode_forward_backward_request,
    decode_sample_response,
)
from tx_types.proto import tinker_public_pb2 as pb


def _request(**tensor: object) -> pb.ForwardBackwardRequest:
    """A valid one-datum request; ``tensor`` overrides fields of its target_tokens Tensor."""
    msg = pb.ForwardBackwardRequest(model_id="m", seq_id=1, loss_fn="cross_entropy")
    datum = msg.data.add()
    datum.model_input.add().encoded_text.tokens = np.array([1, 2, 3], np.int32).tobytes()
    target = datum.loss_fn_inputs["target_tokens"]
    target.dtype = pb.DTYPE_INT64
    target.dense = np.array([4, 5, 6], np.int64).tobytes()
    for key, value in tensor.items():
        if key == "shape":
            del target.shape[:]
            target.shape.extend(value)  # type: ignore[arg-type]
        elif key == "csr":
            target.sparse_csr.CopyFrom(value)  # type: ignore[arg-type]
        else:
            setattr(target, key, value)
    return msg


def _top(**fields: object) -> pb.ForwardBackwardRequest:
    msg = _request()
    for key, value in fields.items():
        setattr(msg, key, value)
    return msg


def test_valid_baseline_decodes() -> None:
    decoded = decode_forward_backward_request(_request().SerializeToString())
    assert decoded.forward_backward_input.data[0].loss_fn_inputs["target_tokens"].data == [4, 5, 6]


def _csr(crow: list[int], col: list[int], values: list[int]) -> pb.SparseCsr:
    return pb.SparseCsr(
        values=np.array(values, np.int64).tobytes(),
        crow_indices=np.array(crow, np.int64).tobytes(),
        col_indices=np.array(col, np.int64).tobytes(),
    )


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (_request(dtype=pb.DTYPE_UNSPECIFIED), r"target_tokens.*dtype"),
        (_request(dtype=17), r"dtype: unsupported value 17"),
        (_request(dense=b"\x01\x02\x03"), r"not a multiple"),
        (_request(shape=[2, 2]), r"shape: \[2, 2\] needs 4 elements"),
        (_request(shape=[3, 1, -1]), r"negative"),
        (_request(shape=[3], csr=_csr([0, 1], [0], [1])), r"2-D shape"),
        (_request(shape=[3, 2], csr=_csr([0, 1, 1], [0], [1])), r"crow_indices"),
        (_request(shape=[3, 2], csr=_csr([0, 1, 1, 3], [0, 1], [1, 2])), r"crow_indices"),
        (_request(shape=[3, 2], csr=_csr([0, 1, 1, 1], [2], [1])), r"out of range"),
        (_request(shape=[3, 2], csr=_csr([0, 2, 2, 2], [1, 1], [1, 2])), r"strictly increasing"),
        (_request(shape=[3, 2], csr=_csr([0, 1, 1, 2], [0], [1, 2])), r"crow_indices|col_indices"),
        (_request(shape=[1 << 20, 1 << 20], csr=_csr([0] * 3, [], [])), r"exceeds"),
        (_top(model_id=""), r"model_id"),
        (_top(loss_fn="no_such_loss"), r"loss_fn"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_request_fields(msg: pb.ForwardBackwardRequest, match: str) -> None:
    with pytest.raises(ProtoDecodeError, match=match):
        decode_forward_backward_request(msg.SerializeToString())


def test_bad_token_bytes_and_unset_chunk() -> None:
    msg = _request()
    msg.data[0].model_input[0].encoded_text.tokens = b"\x00" * 5
    with pytest.raises(ProtoDecodeError, match=r"data\[0\]\.model_input\[0\]\.encoded_text"):
        decode_forward_backward_request(msg.SerializeToString())
    msg = _request()
    msg.data[0].model_input.add()
    with pytest.raises(ProtoDecodeError, match=r"model_input\[1\]: chunk has no"):
        decode_forward_backward_request(msg.SerializeToString())
    msg = _request()
    msg.data[0].model_input[0].image.format = "gif"
    with pytest.raises(ProtoDecodeError, match="format"):
        decode_forward_backward_request(msg.SerializeToString())


def test_bad_span_and_non_finite_weights() -> None:
    msg = _request()
    msg.data[0].model_input_spans.add().prompt_tokens.length = 3  # sequence_id missing
    msg.data[0].loss_fn_input_spans.add().sampled_tokens.sequence_id = "s"
    with pytest.raises(
        ProtoDecodeError, match=r"model_input_spans\[0\]\.prompt_tokens.*sequence_id"
    ):
        decode_forward_backward_request(msg.SerializeToString())
    msg = _request()
    weights = msg.data[0].loss_fn_inputs["weights"]
    weights.dtype = pb.DTYPE_FLOAT32
    weights.dense = np.array([1.0, np.nan, 0.0], np.float32).tobytes()
    with pytest.raises(ProtoDecodeError, match=r"weights.*finite"):
        decode_forward_backward_request(msg.SerializeToString())


def test_misaligned_datum_is_a_user_error() -> None:
    msg = _request(dense=np.array([4, 5], np.int64).tobytes())
    with pytest.raises(ProtoDecodeError, match=r"data\[0\].*target_tokens"):
        decode_forward_backward_request(msg.SerializeToString())


DECODERS: list[Callable[[bytes], object]] = [
    decode_forward_backward_request,
    decode_forward_backward_output,
    decode_sample_response,
]


@pytest.mark.parametrize("decode", DECODERS)
@pytest.mark.parametrize("garbage", [b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x12\x80"])
def test_garbage_and_truncated_bytes(decode: Callable[[bytes], object], garbage: bytes) -> None:
    with pytest.raises(ProtoDecodeError):
        decode(garbage)


def test_truncated_valid_request() -> None:
    body = _request().SerializeToString()
    for cut in (1, 5, len(body) - 1):
        with pytest.raises(ProtoDecodeError):
            decode_forward_backward_request(body[:cut])


def test_zstd_errors() -> None:
    body = _request().SerializeToString()
    frame = zstandard.ZstdCompressor().compress(body)
    assert decode_forward_backward_request(frame, "zstd").model_id == "m"
    assert decode_forward_backward_request(frame, " ZSTD ").model_id == "m"
    with pytest.raises(ProtoDecodeError, match="zstd"):
        decode_forward_backward_request(b"not zstd at all", "zstd")
    with pytest.raises(ProtoDecodeError, match="zstd"):
        decode_forward_backward_request(frame[:-3], "zstd")
    with pytest.raises(ProtoDecodeError, match="only zstd"):
        decode_forward_backward_request(frame, "gzip")
    with pytest.raises(ProtoDecodeError, match="not a valid protobuf"):
        decode_forward_backward_request(frame)  # compressed but the header was forgotten


def test_oversize_zstd_is_refused_before_allocation() -> None:
    bomb = b"\x00" * (4 << 20)
    with_size = zstandard.ZstdCompressor().compress(bomb)  # content size in the frame header
    stream = zstandard.ZstdCompressor().compressobj()
    without_size = stream.compress(bomb) + stream.flush()  # size unknown until decoded
    assert zstandard.frame_content_size(without_size) == -1
    for frame in (with_size, without_size):
        with pytest.raises(ProtoDecodeError, match=r"exceeds|larger than"):
            decode_forward_backward_request(frame, "zstd", max_decompressed_bytes=1 << 20)
    with pytest.raises(ProtoDecodeError, match="exceeds"):
        decode_forward_backward_request(bomb, None, max_decompressed_bytes=1 << 20)


def test_bad_output_offsets_and_stop_reason() -> None:
    out = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    record = out.loss_fn_outputs.add(num_datums=2)
    field = record.fields["logprobs"]
    field.dtype = pb.DTYPE_FLOAT32
    field.data = np.zeros(3, np.float32).tobytes()
    field.offsets = np.array([0, 8, 4], np.int64).tobytes()
    with pytest.raises(ProtoDecodeError, match=r"fields\['logprobs'\]\.offsets"):
        decode_forward_backward_output(out.SerializeToString())
    field.offsets = np.array([0, 6, 12], np.int64).tobytes()
    with pytest.raises(ProtoDecodeError, match="offsets"):
        decode_forward_backward_output(out.SerializeToString())

    resp = pb.SampleResponse()
    resp.sequences.add(stop_reason=5, tokens=b"\x01\x00\x00\x00")  # type: ignore[arg-type]
    with pytest.raises(ProtoDecodeError, match="stop_reason"):
        decode_sample_response(resp.SerializeToString())
    resp = pb.SampleResponse(
        topk_prompt_logprobs=pb.TopkLogprobs(k=2, length=2, token_ids=b"\x00" * 8)
    )
    with pytest.raises(ProtoDecodeError, match="topk_prompt_logprobs"):
        decode_sample_response(resp.SerializeToString())
