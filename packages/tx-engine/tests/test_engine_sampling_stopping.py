"""Stop criteria on real token streams from the tiny Qwen3 tokenizer (byte-level BPE).

Stop strings are checked against a brute-force oracle that decodes the whole prefix after every
token: the incremental matcher must stop at exactly the same token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pytest
from tokenizers import Tokenizer

from tx_engine.sampling import StopCriteria, StopState
from tx_engine.testing import special_token_ids, train_tokenizer

TEXTS = [
    "Hello wörld, the end. Then more text follows here.",
    "Grüße aus Köln: naïve café — 日本語のテキスト and emoji 🎉 done.",
    "def f(x):\n    return x * 2  # the answer\n\nprint(f(21))",
    "User: what is 2+2?\nAssistant: It is 4.\nUser: thanks!",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer("qwen3")


@pytest.fixture(scope="module")
def eos(tok: Tokenizer) -> int:
    return int(special_token_ids("qwen3")["eos_token_id"])


def _decoder(tok: Tokenizer, calls: list[int] | None = None) -> Callable[[Sequence[int]], str]:
    def decode(ids: Sequence[int]) -> str:
        if calls is not None:
            calls.append(len(ids))
        return str(tok.decode(list(ids), skip_special_tokens=False))

    return decode


def _run(state: StopState, tokens: Sequence[int]) -> StopState:
    for token in tokens:
        if state.push(token):
            break
    return state


def _oracle_stop(tok: Tokenizer, tokens: list[int], stops: list[str]) -> int | None:
    """Number of tokens at which the full decoded prefix first contains a stop string."""
    for n in range(1, len(tokens) + 1):
        text = tok.decode(tokens[:n], skip_special_tokens=False)
        if any(s in text for s in stops):
            return n
    return None


def test_default_stops_on_eos_and_keeps_it(tok: Tokenizer, eos: int) -> None:
    body = tok.encode("Hello world.").ids
    state = _run(StopCriteria.from_params(None, [eos]).new_state(50), [*body, eos, *body])
    assert state.tokens == [*body, eos]
    assert state.stop_reason == "stop"


def test_length_when_no_stop_is_hit(tok: Tokenizer, eos: int) -> None:
    body = tok.encode(TEXTS[0]).ids
    state = _run(StopCriteria.from_params(None, [eos]).new_state(5), body)
    assert state.tokens == body[:5]
    assert state.stop_reason == "length"


def test_empty_list_never_stops_not_even_on_eos(tok: Tokenizer, eos: int) -> None:
    state = _run(StopCriteria.from_params([], [eos]).new_state(6), [eos] * 10)
    assert state.tokens == [eos] * 6
    assert state.stop_reason == "length"


def test_token_ids_replace_eos(tok: Tokenizer, eos: int) -> None:
    body = tok.encode("Hello world.").ids
    criteria = StopCriteria.from_params([body[2], 7], [eos])
    state = _run(criteria.new_state(50), [eos, body[0], body[1], body[2], body[3]])
    assert state.tokens == [eos, body[0], body[1], body[2]]  # EOS alone does not stop
    assert state.stop_reason == "stop"


def test_stop_on_the_last_allowed_token_is_a_stop(tok: Tokenizer, eos: int) -> None:
    state = _run(StopCriteria.from_params(None, [eos]).new_state(3), [1, 2, eos, 4])
    assert state.tokens == [1, 2, eos]
    assert state.stop_reason == "stop"
    with pytest.raises(RuntimeError, match="finished"):
        state.push(5)


def test_single_string_spanning_token_boundaries(tok: Tokenizer, eos: int) -> None:
    tokens = tok.encode(TEXTS[0]).ids
    stop = "end. Th"  # starts inside " end", ends inside " Then"
    pieces = [tok.decode([t]) for t in tokens]
    assert not any(stop in p for p in pieces)  # no single token holds it
    state = _run(StopCriteria.from_params(stop, [eos], _decoder(tok)).new_state(100), tokens)
    assert state.stop_reason == "stop"
    assert stop in tok.decode(state.tokens)
    assert stop not in tok.decode(state.tokens[:-1])  # the completing token is the last one
    assert len(state.tokens) == _oracle_stop(tok, tokens, [stop])


def test_multibyte_stop_split_across_byte_tokens(tok: Tokenizer, eos: int) -> None:
    tokens = tok.encode("Hello wörld").ids
    assert tok.decode(tokens[:3]).endswith("\ufffd")  # "ö" really is split over byte tokens
    state = _run(StopCriteria.from_params(["ö"], [eos], _decoder(tok)).new_state(100), tokens)
    assert state.stop_reason == "stop"
    assert len(state.tokens) == _oracle_stop(tok, tokens, ["ö"])
    assert tok.decode(state.tokens).endswith("ö")


def _byte_decoder(pieces: Sequence[bytes]) -> Callable[[Sequence[int]], str]:
    """A byte-level vocabulary of ``pieces``, decoded as a byte-level BPE tokenizer does."""
    return lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")


def test_text_before_an_unfinished_character_is_matched_at_once(eos: int) -> None:
    """A token that completes a stop string and starts a multi-byte character stops at once,
    not when (or if) that character is completed by later tokens."""
    eo = "어".encode()  # 3 bytes
    pieces = [b"Hi ", eo + eo[:1], eo[1:] + eo + eo[:1], eo[1:], b" x"]
    decode = _byte_decoder(pieces)
    assert decode([1]) == "어\ufffd"
    for max_tokens in (1, 5):
        state = _run(StopCriteria.from_params(["어"], [eos], decode).new_state(max_tokens), [1, 2])
        assert (state.tokens, state.stop_reason) == ([1], "stop")
    # Every token ends mid-character: "Hi 어어" is complete after token 2 all the same.
    state = _run(StopCriteria.from_params(["Hi 어어"], [eos], decode).new_state(9), [0, 1, 2, 2])
    assert (state.tokens, state.stop_reason) == ([0, 1, 2], "stop")


def test_random_byte_splits_match_the_full_decode_oracle(eos: int) -> None:
    """Texts cut into byte tokens at random (mid-character too) stop where the full decode of
    the prefix first contains the stop string, never later."""
    rng = np.random.default_rng(1)
    for _ in range(300):
        text = str(rng.choice(TEXTS[:2]))
        data = text.encode()
        cuts = np.sort(rng.choice(np.arange(1, len(data)), size=len(data) // 3, replace=False))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        decode = _byte_decoder(pieces)
        start = int(rng.integers(0, len(text) - 1))
        stops = [text[start : start + int(rng.integers(1, 4))]]
        tokens = list(range(len(pieces)))
        state = _run(StopCriteria.from_params(stops, [eos], decode).new_state(len(tokens)), tokens)
        expected = next(n for n in range(1, len(tokens) + 1) if stops[0] in decode(tokens[:n]))
        assert len(state.tokens) == expected, (pieces, stops)


def test_several_strings_first_match_wins(tok: Tokenizer, eos: int) -> None:
    tokens = tok.encode(TEXTS[3]).ids
    stops = ["thanks", "\nUser:", "Assistant"]
    state = _run(StopCriteria.from_params(stops, [eos], _decoder(tok)).new_state(200), tokens)
    assert state.stop_reason == "stop"
    assert tok.decode(state.tokens).endswith("\nAssistant")
    assert len(state.tokens) == _oracle_stop(tok, tokens, stops)


def test_random_stop_strings_match_the_full_decode_oracle(tok: Tokenizer, eos: int) -> None:
    rng = np.random.default_rng(0)
    for text in TEXTS:
        tokens = tok.encode(text).ids
        for _ in range(12):
            start = int(rng.integers(0, len(text) - 1))
            stops = [text[start : start + int(rng.integers(1, 8))]]
            if rng.random() < 0.5:  # sometimes a second string that may never occur
                stops.append(rng.choice(["zzz", "é", "\n", " the", "🎉"]))
            criteria = StopCriteria.from_params(stops, [eos], _decoder(tok))
            state = _run(criteria.new_state(len(tokens)), tokens)
            expected = _oracle_stop(tok, tokens, stops)
            assert expected is not None
            assert len(state.tokens) == expected, (text, stops)
            assert state.stop_reason == "stop"


def test_no_string_match_runs_to_length_and_decodes_a_bounded_window(
    tok: Tokenizer, eos: int
) -> None:
    tokens = tok.encode(" ".join(TEXTS) * 4).ids
    calls: list[int] = []
    criteria = StopCriteria.from_params(["<never>", "xyzzy"], [eos], _decoder(tok, calls))
    state = _run(criteria.new_state(len(tokens)), tokens)
    assert state.stop_reason == "length"
    assert state.tokens == tokens
    assert len(tokens) > 200
    assert max(calls) <= 8  # only the last chunk plus pending tokens, never the whole text


def test_special_token_text_as_a_stop_string(tok: Tokenizer, eos: int) -> None:
    tokens = [*tok.encode("Hi there").ids, eos, *tok.encode(" more").ids]
    criteria = StopCriteria.from_params("<|im_end|>", [], _decoder(tok))
    state = _run(criteria.new_state(50), tokens)
    assert state.tokens == tokens[: tokens.index(eos) + 1]
    assert state.stop_reason == "stop"


@pytest.mark.parametrize(
    ("stop", "decode", "field"),
    [
        (["a", 3], True, "stop"),
        ([""], True, "stop"),
        ([-1], True, "stop"),
        (["a"], False, "decode_fn"),
        ([True], True, "stop"),
        (5, True, "stop"),
    ],
)
def test_bad_stop_values_name_the_field(
    tok: Tokenizer, stop: list[object], decode: bool, field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        StopCriteria.from_params(stop, [0], _decoder(tok) if decode else None)  # type: ignore[arg-type]


def test_engine_limit_ends_as_length() -> None:
    state = StopCriteria.from_params(None, [0]).new_state(10)
    assert not state.push(5)
    state.end_for_length()
    assert state.stop_reason == "length"
    assert state.tokens == [5]


def test_max_tokens_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        StopCriteria.from_params(None, [0]).new_state(0)
