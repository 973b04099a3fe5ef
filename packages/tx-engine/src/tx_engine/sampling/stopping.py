"""Host-side stop criteria for one sampled sequence, checked one token at a time.

Semantics (Tinker ``SamplingParams.stop``, wire spec §6.8):

* ``None``: stop on the model's EOS token ids.
* ``[]``: never stop (not even on EOS) until ``max_tokens``.
* a list of ints: stop on any of those token ids (they replace EOS).
* a string or a list of strings: stop as soon as the *detokenized* output contains one of them,
  wherever token boundaries fall (they replace EOS too; a list given by the client is the whole
  stop set, which is what makes ``[]`` mean "no stop").

The token that completed the stop is kept in the output and generation ends right there
(``stop_reason = "stop"``); otherwise it ends at ``max_tokens`` with ``"length"``. A stop hit on
the last allowed token counts as ``"stop"``.

Stop strings are matched incrementally, never re-decoding the whole sequence: the state keeps
the offsets of the last emitted chunk (vLLM's prefix/read offsets) and decodes only
``tokens[prefix:]``, the previous chunk plus the new tokens. Decoding the new tokens *after*
the previous chunk and subtracting its text makes tokenizers whose decode depends on context
(leading-space stripping in SentencePiece) come out right. While the pending text ends in an
incomplete UTF-8 sequence (U+FFFD), only that trailing run is held back: the chunk is decoded
again with the next token, so a stop string made of a multi-byte character split over several
byte-level tokens still matches, and the complete text before it is matched at once. Only the last ``len(longest stop) - 1`` characters
of text are kept to catch a stop string that spans the old text and the new.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

DecodeFn = Callable[[Sequence[int]], str]
StopReason = Literal["stop", "length"]
_INCOMPLETE = "\ufffd"  # what byte-level decoders emit for a truncated UTF-8 sequence


@dataclass(frozen=True)
class StopCriteria:
    """The stop set of one request; `new_state` starts the per-sequence tracker."""

    token_ids: frozenset[int] = frozenset()
    strings: tuple[str, ...] = ()
    decode_fn: DecodeFn | None = None

    @classmethod
    def from_params(
        cls,
        stop: str | Sequence[str] | Sequence[int] | None,
        eos_token_ids: Sequence[int],
        decode_fn: DecodeFn | None = None,
    ) -> StopCriteria:
        """Criteria from a request's ``stop`` field.

        ``decode_fn`` turns token ids into text (e.g. ``lambda ids: tok.decode(ids,
        skip_special_tokens=False)``; keep special tokens if stop strings may name them); it is
        required only when ``stop`` holds strings.
        """
        if stop is None:
            return cls(token_ids=frozenset(int(t) for t in eos_token_ids))
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, Sequence | np.ndarray):
            raise ValueError(
                f"stop: must be a string, a list of strings or a list of token ids, got {stop!r}"
            )
        items = list(stop)
        if all(isinstance(s, str) for s in items) and items:
            strings = tuple(str(s) for s in items)
            if any(s == "" for s in strings):
                raise ValueError("stop: stop strings must be non-empty")
            if decode_fn is None:
                raise ValueError("decode_fn: required to match stop strings")
            return cls(strings=strings, decode_fn=decode_fn)
        ids = [int(s) for s in items if isinstance(s, int | np.integer) and not isinstance(s, bool)]
        if len(ids) == len(items):
            if any(t < 0 for t in ids):
                raise ValueError(f"stop: token ids must be >= 0, got {ids}")
            return cls(token_ids=frozenset(ids))
        raise ValueError("stop: must be a string, a list of strings or a list of token ids")

    def new_state(self, max_tokens: int) -> StopState:
        """A fresh tracker for one sequence that may generate at most ``max_tokens`` tokens."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {max_tokens}")
        return StopState(self, max_tokens)


@dataclass
class StopState:
    """Tracks one sequence: `push` each sampled token until it returns True."""

    criteria: StopCriteria
    max_tokens: int
    tokens: list[int] = field(default_factory=list, init=False)
    stop_reason: StopReason | None = field(default=None, init=False)
    # Start of the last emitted chunk (decoding context) and end of the emitted tokens (later
    # ones are pending text), and the last len(longest stop) - 1 characters of emitted text.
    _prefix_offset: int = field(default=0, init=False, repr=False)
    _read_offset: int = field(default=0, init=False, repr=False)
    _tail: str = field(default="", init=False, repr=False)
    # Characters of the pending chunk (tokens[read:]) already emitted while it ended mid-character.
    _emitted: int = field(default=0, init=False, repr=False)

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    def push(self, token: int) -> bool:
        """Record ``token``; True when the sequence must end with it (see `stop_reason`)."""
        if self.done:
            raise RuntimeError("push: sequence already finished with " + str(self.stop_reason))
        token = int(token)
        self.tokens.append(token)
        if token in self.criteria.token_ids or self._completes_stop_string():
            self.stop_reason = "stop"
        elif len(self.tokens) >= self.max_tokens:
            self.stop_reason = "length"
        return self.done

    def end_for_length(self) -> None:
        """End an unfinished sequence as "length" for a cap other than ``max_tokens``.

        For the engine's own limits (context window, cache capacity), which the client sees
        exactly like running out of ``max_tokens``.
        """
        if not self.done:
            self.stop_reason = "length"

    def _completes_stop_string(self) -> bool:
        strings = self.criteria.strings
        if not strings:
            return False
        new_text = self._emit_new_text()
        if not new_text:
            return False
        text = self._tail + new_text
        # A match lying wholly inside the old tail would have stopped an earlier push, so only
        # matches ending in the new text need looking for.
        hit = any(s in text[max(0, len(self._tail) - len(s) + 1) :] for s in strings)
        keep = max(len(s) for s in strings) - 1
        self._tail = text[-keep:] if keep else ""
        return hit

    def _emit_new_text(self) -> str:
        """Text added by the pending tokens that was not emitted yet, up to any incomplete
        character at its end (a trailing run of U+FFFD): a token may complete text and start
        a multi-byte character at once, and that text must be matched now, not once the
        character is complete (which may take several tokens, or never come)."""
        decode = self.criteria.decode_fn
        assert decode is not None  # from_params guarantees it whenever strings are set
        prefix_text = decode(self.tokens[self._prefix_offset : self._read_offset])
        full_text = decode(self.tokens[self._prefix_offset :])
        if len(full_text) <= len(prefix_text):
            return ""
        pending = full_text[len(prefix_text) :]
        complete = pending.rstrip(_INCOMPLETE)
        new_text = complete[self._emitted :]
        if len(complete) < len(pending):  # ends mid-character: keep decoding from here
            self._emitted = max(self._emitted, len(complete))
            return new_text
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.tokens)
        self._emitted = 0
        return new_text
