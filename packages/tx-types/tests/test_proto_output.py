"""ForwardBackwardOutput: our server encoder -> the SDK's own decoder, and our client decoder."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tinker.proto.response_conv import deserialize_forward_backward_output

from tx_types import ForwardBackwardOutput, TensorData
from tx_types.proto import decode_forward_backward_output, encode_forward_backward_output
from tx_types.proto import tinker_public_pb2 as pb


def _sdk_array(td: object) -> np.ndarray:
    arr = np.asarray(td.data, dtype=np.float32 if td.dtype == "float32" else np.int64)  # type: ignore[attr-defined]
    return arr.reshape(td.shape)  # type: ignore[attr-defined]


def _ours(td: TensorData) -> np.ndarray:
    return td.to_numpy()


def _assert_same(decoded: object, expected: ForwardBackwardOutput) -> None:
    outputs = decoded.loss_fn_outputs  # type: ignore[attr-defined]
    assert len(outputs) == len(expected.loss_fn_outputs)
    for got, want in zip(outputs, expected.loss_fn_outputs, strict=True):
        assert set(got) == set(want)
        for name, td in want.items():
            assert got[name].dtype == td.dtype
            assert list(got[name].shape) == list(td.to_numpy().shape)
            conv = _sdk_array if not isinstance(got[name], TensorData) else _ours
            np.testing.assert_array_equal(conv(got[name]), td.to_numpy())
    got_metrics = decoded.metrics  # type: ignore[attr-defined]
    assert set(got_metrics) == set(expected.metrics)
    for key, value in expected.metrics.items():
        assert got_metrics[key] == value or (math.isnan(value) and math.isnan(got_metrics[key]))


def _output() -> ForwardBackwardOutput:
    rng = np.random.default_rng(0)
    lengths = [4, 1, 9]
    return ForwardBackwardOutput(
        loss_fn_output_type="ArrayRecord",
        loss_fn_outputs=[
            {
                "logprobs": TensorData.from_numpy(-rng.random(n).astype(np.float32)),
                "elementwise_loss": TensorData.from_numpy(rng.random(n).astype(np.float32)),
                "ids": TensorData.from_numpy(rng.integers(-(2**40), 2**40, n)),
            }
            for n in lengths
        ],
        metrics={"loss:sum": 1.25, "nan_metric:mean": float("nan"), "e_max:max": -3.0},
    )


def test_sdk_decodes_our_1d_outputs() -> None:
    out = _output()
    body = encode_forward_backward_output(out)
    sdk = deserialize_forward_backward_output(body)
    assert sdk.loss_fn_output_type == "ArrayRecord"
    _assert_same(sdk, out)
    _assert_same(decode_forward_backward_output(body), out)
    msg = pb.ForwardBackwardOutput.FromString(body)
    assert len(msg.loss_fn_outputs) == 1  # one record for a rectangular batch
    assert msg.loss_fn_outputs[0].num_datums == 3
    assert list(msg.loss_fn_outputs[0].fields["logprobs"].trailing_shape) == []


def test_nk_logprobs_shaped_like_targets_and_ragged_k_use_separate_records() -> None:
    rng = np.random.default_rng(1)
    shapes = [(5, 3), (2, 3), (4, 7), (6,), (1, 3)]
    out = ForwardBackwardOutput(
        loss_fn_output_type="some.module:ArrayRecord",
        loss_fn_outputs=[
            {"logprobs": TensorData.from_numpy(-rng.random(s).astype(np.float32))} for s in shapes
        ],
        metrics={"loss:sum": 0.0},
    )
    body = encode_forward_backward_output(out)
    msg = pb.ForwardBackwardOutput.FromString(body)
    assert [r.num_datums for r in msg.loss_fn_outputs] == [2, 1, 1, 1]
    assert [list(r.fields["logprobs"].trailing_shape) for r in msg.loss_fn_outputs] == [
        [3],
        [7],
        [],
        [3],
    ]
    sdk = deserialize_forward_backward_output(body)
    assert sdk.loss_fn_output_type == "ArrayRecord"
    _assert_same(sdk, out)
    ours = decode_forward_backward_output(body)
    assert ours.loss_fn_output_type == "ArrayRecord"
    _assert_same(ours, out)


def test_empty_fields_keep_datum_count_and_empty_output() -> None:
    out = ForwardBackwardOutput(
        loss_fn_output_type="ArrayRecord", loss_fn_outputs=[{}, {}], metrics={"loss:sum": 2.0}
    )
    body = encode_forward_backward_output(out)
    assert deserialize_forward_backward_output(body).loss_fn_outputs == [{}, {}]
    assert decode_forward_backward_output(body).loss_fn_outputs == [{}, {}]
    empty = ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", loss_fn_outputs=[])
    assert decode_forward_backward_output(encode_forward_backward_output(empty)) == empty


def test_zero_length_and_scalar_outputs() -> None:
    out = ForwardBackwardOutput(
        loss_fn_output_type="ArrayRecord",
        loss_fn_outputs=[
            {"x": TensorData(data=[], dtype="float32", shape=[0])},
            {"x": TensorData(data=[2.5], dtype="float32", shape=[])},
        ],
    )
    sdk = deserialize_forward_backward_output(encode_forward_backward_output(out))
    assert [list(d["x"].shape) for d in sdk.loss_fn_outputs] == [[0], [1]]
    assert sdk.loss_fn_outputs[1]["x"].data == [2.5]


def test_inconsistent_field_sets_and_sparse_outputs_are_refused() -> None:
    one = TensorData(data=[1.0], dtype="float32")
    with pytest.raises(ValueError, match="same fields"):
        encode_forward_backward_output(
            ForwardBackwardOutput(
                loss_fn_output_type="ArrayRecord",
                loss_fn_outputs=[{"a": one}, {"b": one}],
            )
        )
    sparse = TensorData.from_numpy_sparse(np.diag(np.arange(1, 9, dtype=np.float32)))
    assert sparse.sparse_crow_indices is not None
    with pytest.raises(ValueError, match="dense"):
        encode_forward_backward_output(
            ForwardBackwardOutput(
                loss_fn_output_type="ArrayRecord", loss_fn_outputs=[{"a": sparse}]
            )
        )


def test_bf16_and_int32_from_other_servers_are_widened_like_the_sdk() -> None:
    values = np.array([1.5, -2.0, 0.099609375], np.float32)  # exactly representable in bf16
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)
    msg = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    record = msg.loss_fn_outputs.add(num_datums=1)
    record.fields["lp"].CopyFrom(
        pb.BatchedTensor(
            data=bf16.tobytes(),
            offsets=np.array([0, 6], np.int64).tobytes(),
            dtype=pb.DTYPE_BFLOAT16,
        )
    )
    record.fields["ids"].CopyFrom(
        pb.BatchedTensor(
            data=np.array([7, 8, 9], np.int32).tobytes(),
            offsets=np.array([0, 12], np.int64).tobytes(),
            dtype=pb.DTYPE_INT32,
        )
    )
    body = msg.SerializeToString()
    ours = decode_forward_backward_output(body).loss_fn_outputs[0]
    sdk = deserialize_forward_backward_output(body).loss_fn_outputs[0]
    assert ours["lp"].dtype == sdk["lp"].dtype == "float32"
    assert ours["lp"].data == sdk["lp"].data == values.tolist()
    assert ours["ids"].dtype == sdk["ids"].dtype == "int64"
    assert ours["ids"].data == sdk["ids"].data == [7, 8, 9]


_finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@st.composite
def _outputs(draw: st.DrawFn) -> ForwardBackwardOutput:
    names = draw(st.lists(st.sampled_from(["logprobs", "loss", "ids"]), unique=True, max_size=3))
    datums = []
    for _ in range(draw(st.integers(0, 4))):
        n = draw(st.integers(0, 5))
        trailing = draw(st.sampled_from([[], [1], [3]]))
        datum = {}
        for name in names:
            size = n * math.prod(trailing)
            if name == "ids":
                data = draw(
                    st.lists(st.integers(-(2**63), 2**63 - 1), min_size=size, max_size=size)
                )
                datum[name] = TensorData(data=data, dtype="int64", shape=[n, *trailing])
            else:
                data = draw(st.lists(_finite32, min_size=size, max_size=size))
                datum[name] = TensorData(data=data, dtype="float32", shape=[n, *trailing])
        datums.append(datum)
    metrics = draw(
        st.dictionaries(
            st.from_regex(r"[a-z]{1,4}:(sum|mean)", fullmatch=True),
            st.floats(allow_nan=False),
            max_size=3,
        )
    )
    return ForwardBackwardOutput(
        loss_fn_output_type="ArrayRecord", loss_fn_outputs=datums, metrics=metrics
    )


@settings(max_examples=60, deadline=None)
@given(_outputs())
def test_round_trip_property(out: ForwardBackwardOutput) -> None:
    body = encode_forward_backward_output(out)
    assert decode_forward_backward_output(body) == out
    _assert_same(deserialize_forward_backward_output(body), out)
