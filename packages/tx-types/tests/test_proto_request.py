"""ForwardBackwardRequest: SDK-encoded bytes -> our server-side decoder, and our client encoder.

The bytes come from the SDK's own send path (``tinker.proto.request_conv.
forward_backward_request_to_proto`` + ``forward_only`` + optional ``zstd.ZstdCompressor``, as
in ``tinker.resources.training``). 2-D ``[N, K]`` targets/weights are given to the SDK as CSR
``TensorData`` built by a NumPy oracle of ``torch.Tensor.to_sparse_csr`` (what
``TensorData.from_torch_sparse`` sends; torch is not in the workspace).
"""

from __future__ import annotations

import numpy as np
import pytest
import tinker.types as tt
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from tinker.proto import tinker_public_pb2 as sdk_pb
from tinker.proto.request_conv import forward_backward_request_to_proto

from tx_types import (
    Datum,
    DmelChunk,
    EncodedTextChunk,
    ForwardBackwardInput,
    ImageChunk,
    ModelInput,
    PromptProvenanceSpan,
    SampledProvenanceSpan,
    TensorData,
)
from tx_types.proto import (
    decode_forward_backward_request,
    encode_forward_backward_request,
)


def _sdk_body(
    data: list[tt.Datum],
    loss_fn: str = "cross_entropy",
    config: dict[str, float | str] | None = None,
    *,
    forward_only: bool = False,
    compress: bool = False,
    seq_id: int | None = 7,
) -> bytes:
    request = tt.ForwardBackwardRequest(
        forward_backward_input=tt.ForwardBackwardInput(
            data=data,
            loss_fn=loss_fn,  # type: ignore[arg-type]
            loss_fn_config=config,
        ),
        model_id="sess:train:0",
        seq_id=seq_id,
    )
    msg = forward_backward_request_to_proto(request)
    msg.forward_only = forward_only
    body = msg.SerializeToString()
    return zstandard.ZstdCompressor().compress(body) if compress else body


def _sdk_csr(dense: np.ndarray) -> tt.TensorData:
    """What ``TensorData.from_torch_sparse(t)`` produces (row-major nonzeros, pad 0)."""
    rows, cols = np.nonzero(dense)
    crow = np.zeros(dense.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=dense.shape[0]), out=crow[1:])
    dtype = "int64" if dense.dtype.kind == "i" else "float32"
    return tt.TensorData(
        data=dense[rows, cols],
        dtype=dtype,
        shape=list(dense.shape),
        sparse_crow_indices=crow.tolist(),
        sparse_col_indices=cols.tolist(),
    )


def _dense(td: TensorData) -> np.ndarray:
    assert td.sparse_crow_indices is None
    assert td.shape is not None
    dtype = np.int64 if td.dtype == "int64" else np.float32
    return np.asarray(td.data, dtype=dtype).reshape(td.shape)


def _sdk_text_datum(n: int, rng: np.random.Generator, **inputs: object) -> tt.Datum:
    tokens = rng.integers(0, 150_000, size=n).tolist()
    return tt.Datum(model_input=tt.ModelInput.from_ints(tokens), loss_fn_inputs=inputs)  # type: ignore[arg-type]


@pytest.mark.parametrize("compress", [False, True])
def test_sdk_dense_1d_request_decodes_to_same_values(compress: bool) -> None:
    rng = np.random.default_rng(0)
    targets = [rng.integers(0, 150_000, size=n) for n in (5, 1, 33)]
    weights = [rng.random(n, dtype=np.float32) for n in (5, 1, 33)]
    data = [
        _sdk_text_datum(len(t), rng, target_tokens=t.tolist(), weights=w)
        for t, w in zip(targets, weights, strict=True)
    ]
    body = _sdk_body(data, compress=compress, forward_only=True)
    decoded = decode_forward_backward_request(body, "zstd" if compress else None)

    assert decoded.model_id == "sess:train:0"
    assert decoded.seq_id == 7
    assert decoded.forward_only is True
    fwd = decoded.forward_backward_input
    assert fwd.loss_fn == "cross_entropy"
    assert fwd.loss_fn_config is None
    for datum, sdk_datum, t, w in zip(fwd.data, data, targets, weights, strict=True):
        assert datum.model_input.to_ints() == sdk_datum.model_input.to_ints()
        got_t = _dense(datum.loss_fn_inputs["target_tokens"])
        got_w = _dense(datum.loss_fn_inputs["weights"])
        assert got_t.dtype == np.int64
        assert got_t.shape == t.shape
        np.testing.assert_array_equal(got_t, t)
        np.testing.assert_array_equal(got_w, w)  # float32 bits preserved exactly


@pytest.mark.parametrize("compress", [False, True])
def test_sdk_csr_2d_targets_and_weights_decode_to_dense(compress: bool) -> None:
    rng = np.random.default_rng(1)
    n, k = 12, 20
    targets = np.where(rng.random((n, k)) < 0.2, rng.integers(1, 1000, (n, k)), 0).astype(np.int64)
    weights = np.where(targets != 0, rng.random((n, k)), 0.0).astype(np.float32)
    sparse_t, sparse_w = _sdk_csr(targets), _sdk_csr(weights)
    assert sparse_t.sparse_crow_indices is not None  # really CSR on the wire
    datum = _sdk_text_datum(n, rng, target_tokens=sparse_t, weights=sparse_w)
    plain = _sdk_text_datum(n, rng, target_tokens=targets, weights=weights)

    body = _sdk_body([datum, plain], compress=compress)
    msg = sdk_pb.ForwardBackwardRequest.FromString(
        zstandard.ZstdDecompressor().decompress(body) if compress else body
    )
    assert msg.data[0].loss_fn_inputs["target_tokens"].WhichOneof("encoding") == "sparse_csr"
    decoded = decode_forward_backward_request(body, "zstd" if compress else None)

    for got in decoded.forward_backward_input.data:
        np.testing.assert_array_equal(_dense(got.loss_fn_inputs["target_tokens"]), targets)
        np.testing.assert_array_equal(_dense(got.loss_fn_inputs["weights"]), weights)
        assert got.loss_fn_inputs["weights"].shape == [n, k]


def test_loss_config_numbers_and_strings_prefer_v2() -> None:
    rng = np.random.default_rng(2)
    data = [
        _sdk_text_datum(
            3,
            rng,
            target_tokens=[1, 2, 3],
            logprobs=[-1.0, -2.0, -0.5],
            advantages=[0.5, -1.0, 2.0],
        )
    ]
    config = {"clip_low_threshold": 0.75, "clip_high_threshold": 1.25, "loss_id": "abc-123"}
    decoded = decode_forward_backward_request(_sdk_body(data, "ppo", config))
    fwd = decoded.forward_backward_input
    assert fwd.loss_fn == "ppo"
    assert fwd.loss_fn_config == config
    assert isinstance(fwd.loss_fn_config["clip_low_threshold"], float)

    # An old client that only writes the legacy numeric map is still understood.
    msg = sdk_pb.ForwardBackwardRequest.FromString(_sdk_body(data, "ppo", config))
    msg.ClearField("loss_fn_config_v2")
    legacy = decode_forward_backward_request(msg.SerializeToString())
    assert legacy.forward_backward_input.loss_fn_config == {
        "clip_low_threshold": 0.75,
        "clip_high_threshold": 1.25,
    }


def test_images_audio_spans_and_seq_id_zero() -> None:
    image = tt.ImageChunk(data=b"\x89PNG fake bytes", format="png", expected_tokens=4)
    dmel = tt.DmelChunk(dmel=b"\x00\x01\x03" + bytes(12))  # TensorContainer header: 1-D, 3
    sdk_datum = tt.Datum(
        model_input=tt.ModelInput(chunks=[tt.EncodedTextChunk(tokens=[5, 6]), image, dmel]),
        loss_fn_inputs={"target_tokens": tt.TensorData(data=[1] * 9, dtype="int64", shape=[9])},
    ).with_provenance(
        model_input=[tt.PromptProvenanceSpan(sequence_id="s1", offset=2, length=9)],
        loss_fn_inputs=[tt.SampledProvenanceSpan(sequence_id="s2", length=9)],
    )
    decoded = decode_forward_backward_request(_sdk_body([sdk_datum], seq_id=None))
    assert decoded.seq_id is None
    datum = decoded.forward_backward_input.data[0]
    text, img, audio = datum.model_input.chunks
    assert isinstance(text, EncodedTextChunk)
    assert text.tokens == [5, 6]
    assert isinstance(img, ImageChunk)
    assert (img.data, img.format, img.expected_tokens) == (image.data, "png", 4)
    assert isinstance(audio, DmelChunk)
    assert audio.dmel == dmel.dmel
    assert datum.model_input.length == 9
    assert datum.model_input_spans == [PromptProvenanceSpan(sequence_id="s1", offset=2, length=9)]
    assert datum.loss_fn_input_spans == [SampledProvenanceSpan(sequence_id="s2", length=9)]


def _tx_input() -> ForwardBackwardInput:
    targets = np.array([[3, 0, 0], [0, 0, 9], [0, 0, 0], [4, 5, 6]], dtype=np.int64)
    return ForwardBackwardInput(
        data=[
            Datum(
                model_input=ModelInput(chunks=[EncodedTextChunk(tokens=[1, 2, 3, 4])]),
                loss_fn_inputs={
                    "target_tokens": TensorData.from_numpy_sparse(targets),
                    "weights": TensorData.from_numpy(np.ones((4, 3), np.float32)),
                },
            ),
            Datum(
                model_input=ModelInput(
                    chunks=[ImageChunk(data=b"jpg", format="jpeg", expected_tokens=2)]
                ),
                loss_fn_inputs={"target_tokens": TensorData(data=[7, 8], dtype="int64")},
                model_input_spans=[SampledProvenanceSpan(sequence_id="a", length=2)],
                loss_fn_input_spans=[PromptProvenanceSpan(sequence_id="b", offset=1, length=2)],
            ),
        ],
        loss_fn="importance_sampling",
        loss_fn_config={"beta": 0.5, "mode": "x"},
    )


@pytest.mark.parametrize("compress", [False, True])
def test_client_encoder_matches_sdk_encoder(compress: bool) -> None:
    fwd = _tx_input()
    ours = encode_forward_backward_request("m:train:1", 3, fwd, True, compress)
    sdk = _sdk_body(
        [_to_sdk(d) for d in fwd.data],
        "importance_sampling",
        {"beta": 0.5, "mode": "x"},
        forward_only=True,
        seq_id=3,
    )
    raw = zstandard.ZstdDecompressor().decompress(ours) if compress else ours
    sdk_msg = sdk_pb.ForwardBackwardRequest.FromString(sdk)
    sdk_msg.model_id = "m:train:1"
    assert sdk_pb.ForwardBackwardRequest.FromString(raw) == sdk_msg
    # ...and our own decoder inverts it (CSR densified).
    back = decode_forward_backward_request(ours, "zstd" if compress else None)
    assert back.forward_backward_input.loss_fn_config == fwd.loss_fn_config
    np.testing.assert_array_equal(
        _dense(back.forward_backward_input.data[0].loss_fn_inputs["target_tokens"]),
        fwd.data[0].loss_fn_inputs["target_tokens"].to_numpy(),
    )
    # Shape-less 1-D inputs come back with their shape filled in; everything else is equal.
    expected = fwd.data[1].model_copy(
        update={
            "loss_fn_inputs": {"target_tokens": TensorData(data=[7, 8], dtype="int64", shape=[2])}
        }
    )
    assert back.forward_backward_input.data[1] == expected


def _to_sdk(datum: Datum) -> tt.Datum:
    chunks: list[tt.ModelInputChunk] = []
    for c in datum.model_input.chunks:
        if isinstance(c, EncodedTextChunk):
            chunks.append(tt.EncodedTextChunk(tokens=c.tokens))
        else:
            assert isinstance(c, ImageChunk)
            chunks.append(
                tt.ImageChunk(data=c.data, format=c.format, expected_tokens=c.expected_tokens)
            )
    inputs = {
        k: tt.TensorData(
            data=np.asarray(v.data),
            dtype=v.dtype,
            shape=v.shape,
            sparse_crow_indices=v.sparse_crow_indices,
            sparse_col_indices=v.sparse_col_indices,
        )
        for k, v in datum.loss_fn_inputs.items()
    }
    spans = {}
    if datum.model_input_spans is not None:
        conv = {
            PromptProvenanceSpan: tt.PromptProvenanceSpan,
            SampledProvenanceSpan: tt.SampledProvenanceSpan,
        }
        spans = {
            name: [
                conv[type(s)](sequence_id=s.sequence_id, offset=s.offset, length=s.length)
                for s in getattr(datum, name)
            ]
            for name in ("model_input_spans", "loss_fn_input_spans")
        }
    return tt.Datum(model_input=tt.ModelInput(chunks=chunks), loss_fn_inputs=inputs, **spans)


@st.composite
def _inputs(draw: st.DrawFn) -> ForwardBackwardInput:
    data = []
    for _ in range(draw(st.integers(1, 3))):
        n = draw(st.integers(0, 6))
        k = draw(st.sampled_from([None, 1, 4]))
        shape = (n,) if k is None else (n, k)
        size = int(np.prod(shape))
        ids = np.array(
            draw(st.lists(st.sampled_from([0, 0, 0, 1, 2**40]), min_size=size, max_size=size)),
            np.int64,
        ).reshape(shape)
        w = np.array(
            draw(
                st.lists(
                    st.floats(width=32, allow_nan=False, allow_infinity=False),
                    min_size=size,
                    max_size=size,
                )
            ),
            np.float32,
        ).reshape(shape)
        sparse = draw(st.booleans()) and k is not None
        make = TensorData.from_numpy_sparse if sparse else TensorData.from_numpy
        tokens = draw(st.lists(st.integers(0, 2**31 - 1), min_size=n, max_size=n))
        data.append(
            Datum(
                model_input=ModelInput(chunks=[EncodedTextChunk(tokens=tokens)]),
                loss_fn_inputs={"target_tokens": make(ids), "weights": make(w)},
            )
        )
    config = draw(
        st.dictionaries(
            st.sampled_from(["a", "b", "c"]),
            st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=5)),
        )
    )
    return ForwardBackwardInput(data=data, loss_fn="cross_entropy", loss_fn_config=config or None)


@settings(max_examples=40, deadline=None)
@given(_inputs(), st.booleans(), st.integers(0, 2**31 - 1))
def test_request_round_trip_property(fwd: ForwardBackwardInput, compress: bool, seq: int) -> None:
    body = encode_forward_backward_request("m", seq, fwd, False, compress)
    back = decode_forward_backward_request(body, "zstd" if compress else None)
    assert back.seq_id == (seq or None)
    assert back.forward_backward_input.loss_fn_config == fwd.loss_fn_config
    for got, want in zip(back.forward_backward_input.data, fwd.data, strict=True):
        assert got.model_input == want.model_input
        for name, td in want.loss_fn_inputs.items():
            np.testing.assert_array_equal(_dense(got.loss_fn_inputs[name]), td.to_numpy())
    # The SDK encoder, fed the same data, produces the same message.
    sdk = sdk_pb.ForwardBackwardRequest.FromString(
        _sdk_body([_to_sdk(d) for d in fwd.data], "cross_entropy", fwd.loss_fn_config, seq_id=seq)
    )
    sdk.model_id = "m"
    raw = zstandard.ZstdDecompressor().decompress(body) if compress else body
    assert sdk_pb.ForwardBackwardRequest.FromString(raw) == sdk
