"""SampleResponse: our server encoder -> the SDK's own decoder, and our client decoder."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tinker.proto.response_conv import deserialize_sample_response

from tx_types import PromptAltTokens, SampledSequence, SampleResponse, TensorData
from tx_types.proto import (
    MASK_LOGPROB,
    ProtoDecodeError,
    decode_sample_response,
    encode_sample_response,
)
from tx_types.proto import tinker_public_pb2 as pb


def _response() -> SampleResponse:
    return SampleResponse(
        sequences=[
            SampledSequence(
                stop_reason="stop",
                sequence_id="s0",
                tokens=[11, 12, 2],
                logprobs=[-0.5, -1.25, -0.125],
                topk_logprobs=[[(11, -0.5), (3, -2.0)], None, [(2, -0.125)]],
            ),
            SampledSequence(stop_reason="length", sequence_id="s1", tokens=[9], logprobs=[-3.0]),
            SampledSequence(stop_reason="length", sequence_id="s2", tokens=[]),
        ],
        prompt_logprobs=[None, -1.5, None, -0.25],
        topk_prompt_logprobs=[None, [(4, -1.5), (0, -2.5), (6, -3.0)], None, [(1, -0.25)]],
        # CSR like the request it answers: unlisted cells were -1 ("not requested").
        target_prompt_logprobs=TensorData(
            data=[-5.0, -7.0, -8.0],
            dtype="float32",
            shape=[4, 6],
            sparse_crow_indices=[0, 1, 1, 3, 3],
            sparse_col_indices=[0, 2, 5],
        ),
        prompt_cache_hit_tokens=3,
        prompt_alt_tokens=PromptAltTokens(
            tokens=TensorData.from_numpy(np.array([[1, 2], [3, 4], [5, 6]], dtype=np.int64)),
            logprobs=TensorData.from_numpy(-np.arange(6, dtype=np.float32).reshape(3, 2)),
        ),
    )


def test_sdk_decodes_our_sample_response() -> None:
    resp = _response()
    sdk = deserialize_sample_response(encode_sample_response(resp))
    assert [s.stop_reason for s in sdk.sequences] == ["stop", "length", "length"]
    assert [s.tokens for s in sdk.sequences] == [[11, 12, 2], [9], []]
    assert [s.logprobs for s in sdk.sequences] == [[-0.5, -1.25, -0.125], [-3.0], None]
    assert sdk.sequences[0].topk_logprobs == [[(11, -0.5), (3, -2.0)], None, [(2, -0.125)]]
    assert sdk.sequences[1].topk_logprobs is None
    assert sdk.prompt_logprobs == [None, -1.5, None, -0.25]
    assert np.isnan(sdk.prompt_logprobs_np[0])
    # (0, -2.5) inside a row is a real entry, not the sentinel, and survives.
    assert sdk.topk_prompt_logprobs == [None, [(4, -1.5), (0, -2.5), (6, -3.0)], None, [(1, -0.25)]]
    assert sdk.topk_prompt_logprobs_np is not None
    assert sdk.topk_prompt_logprobs_np.token_ids.shape == (4, 3)
    assert sdk.topk_prompt_logprobs_np.logprobs[0, 0] == MASK_LOGPROB
    target = resp.target_prompt_logprobs
    assert target is not None
    assert target.sparse_crow_indices is not None
    assert sdk.target_prompt_logprobs is not None
    assert sdk.target_prompt_logprobs.sparse_crow_indices == target.sparse_crow_indices
    assert sdk.target_prompt_logprobs.sparse_col_indices == target.sparse_col_indices
    assert sdk.target_prompt_logprobs.data == target.data
    assert sdk.prompt_cache_hit_tokens == 3
    assert sdk.prompt_alt_tokens is not None
    assert sdk.prompt_alt_tokens.tokens.tolist() == [[1, 2], [3, 4], [5, 6]]
    assert sdk.prompt_alt_tokens.tokens.dtype == "int64"
    assert sdk.prompt_alt_tokens.logprobs.tolist() == [[-0.0, -1.0], [-2.0, -3.0], [-4.0, -5.0]]


def test_our_decoder_agrees_and_stamps_sequence_ids() -> None:
    resp = _response()
    body = encode_sample_response(resp)
    assert decode_sample_response(body, ["s0", "s1", "s2"]) == resp
    anonymous = decode_sample_response(body)
    assert [s.sequence_id for s in anonymous.sequences] == [None, None, None]
    with pytest.raises(ProtoDecodeError, match="sequence ids"):
        decode_sample_response(body, ["only-one"])


def test_optional_parts_absent() -> None:
    resp = SampleResponse(
        sequences=[SampledSequence(stop_reason="stop", tokens=[1], logprobs=[-1.0])]
    )
    body = encode_sample_response(resp)
    msg = pb.SampleResponse.FromString(body)
    for name in (
        "prompt_logprobs",
        "topk_prompt_logprobs",
        "target_prompt_logprobs",
        "prompt_alt_tokens",
    ):
        assert not msg.HasField(name), name
    sdk = deserialize_sample_response(body)
    assert sdk.prompt_logprobs is None
    assert sdk.topk_prompt_logprobs is None
    assert sdk.target_prompt_logprobs is None
    assert sdk.prompt_alt_tokens is None
    assert decode_sample_response(body) == resp


def test_all_none_topk_rows_survive() -> None:
    resp = SampleResponse(sequences=[], topk_prompt_logprobs=[None, None])
    body = encode_sample_response(resp)
    assert deserialize_sample_response(body).topk_prompt_logprobs == [None, None]
    assert decode_sample_response(body).topk_prompt_logprobs == [None, None]


def test_many_topk_rows_match_the_sdk_matrices() -> None:
    rng = np.random.default_rng(0)
    n, k = 5_000, 5
    rows = [
        list(zip(rng.integers(1, 10**5, k).tolist(), (-rng.random(k)).tolist(), strict=True))
        for _ in range(n)
    ]
    resp = SampleResponse(
        sequences=[
            SampledSequence(
                stop_reason="length", tokens=list(range(n)), logprobs=[-1.0] * n, topk_logprobs=rows
            )
        ],
    )
    body = encode_sample_response(resp)
    sdk = deserialize_sample_response(body)
    assert sdk.sequences[0].tokens_np.shape == (n,)
    np.testing.assert_array_equal(
        sdk.sequences[0].topk_logprobs_np.token_ids, np.array([[t for t, _ in r] for r in rows])
    )
    assert decode_sample_response(body).sequences[0].topk_logprobs == [
        [(t, float(np.float32(lp))) for t, lp in r] for r in rows
    ]


_lp = st.floats(width=32, max_value=0.0, allow_nan=False, allow_infinity=False).filter(
    lambda x: x != MASK_LOGPROB
)
_pair = st.tuples(st.integers(1, 2**31 - 1), _lp)
_rows = st.lists(st.one_of(st.none(), st.lists(_pair, min_size=1, max_size=4)), max_size=6)


@st.composite
def _sequences(draw: st.DrawFn) -> SampledSequence:
    n = draw(st.integers(0, 6))
    tokens = draw(st.lists(st.integers(0, 2**31 - 1), min_size=n, max_size=n))
    logprobs = draw(st.one_of(st.none(), st.lists(_lp, min_size=n, max_size=n)))
    topk = draw(
        st.one_of(
            st.none(),
            st.lists(
                st.one_of(st.none(), st.lists(_pair, min_size=1, max_size=3)),
                min_size=n,
                max_size=n,
            ),
        )
    )
    if logprobs is not None and n == 0:
        logprobs = None  # empty logprobs bytes mean "not requested" on the wire
    if topk is not None and n == 0:
        topk = None
    stop = draw(st.sampled_from(["stop", "length"]))
    return SampledSequence(stop_reason=stop, tokens=tokens, logprobs=logprobs, topk_logprobs=topk)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(_sequences(), max_size=3),
    st.one_of(st.none(), st.lists(st.one_of(st.none(), _lp), min_size=1, max_size=6)),
    st.one_of(st.none(), _rows.filter(bool)),
    st.integers(0, 2**31 - 1),
)
def test_round_trip_property(
    sequences: list[SampledSequence],
    prompt_logprobs: list[float | None] | None,
    topk: list[list[tuple[int, float]] | None] | None,
    hits: int,
) -> None:
    resp = SampleResponse(
        sequences=sequences,
        prompt_logprobs=prompt_logprobs,
        topk_prompt_logprobs=topk,
        prompt_cache_hit_tokens=hits,
    )
    body = encode_sample_response(resp)
    assert decode_sample_response(body) == resp
    sdk = deserialize_sample_response(body)
    assert sdk.prompt_logprobs == prompt_logprobs
    assert sdk.topk_prompt_logprobs == topk
    for ours, theirs in zip(sequences, sdk.sequences, strict=True):
        assert (theirs.tokens, theirs.logprobs, theirs.stop_reason) == (
            ours.tokens,
            ours.logprobs,
            ours.stop_reason,
        )
        assert theirs.topk_logprobs == ours.topk_logprobs
    assert all(math.isfinite(x) for x in (prompt_logprobs or []) if x is not None)
