"""Prefix cache: keys/values of earlier prompts and sequences, reused when a prompt extends them.

Multi-turn sampling (an RL agent's episode, a chat) sends each turn's prompt as the previous
turn's prompt + its completion + the new message. Without a cache every turn prefills the whole
conversation again: turn ``k`` costs ``O(k)`` prefill and an episode ``O(k²)``. Many prompts
also start alike (a system prompt, few-shot examples). Here the keys/values of every prompt an
admission prefills, and of every sampled row when it ends (its prompt and every token it fed
back, i.e. all its tokens but the last), are copied into a device *pool*
(:func:`tx_engine.step.save_prefix`, one copy per admission or fetch); a later prompt whose
first tokens equal an entry's takes the first ``C`` of them as context and prefills only the
rest (:func:`tx_engine.step.admit` with ``context_pc``). Prompts that arrive together and share
a prefix are admitted one step apart so that the later ones reuse it
(:meth:`PrefixCache.would_reuse`, ``ContinuousRun._waits``).

Exactness. The keys/values of token ``j`` depend only on tokens ``0..j`` and the weights, and
rope positions are per row, so a reused prefix is the same context a full prefill would
compute (up to float summation order: ~1e-6). Entries are keyed by ``(adapter slot, slot
version)``: any change to a slot's weights (an optimizer step, a load, a new adapter in the
slot) bumps :meth:`TrainingEngine.slot_version`, so old entries never match again and age out.

Shapes. ``C`` is bucketed (two sizes per octave: 16, 24, 32, 48, 64, 96, …, each ≤ the common
prefix) so the admission programs stay few; the rest of the prompt goes through its own
bucket ``T``. A match is used only if ``C + T`` is at most the prompt's own bucket, so a row
never needs more cache slots than without the cache (the run's fit rules stay as they are).

Memory. The pool holds ``capacity`` token slots (``[L, 1, capacity, K, H]`` keys and values,
like a one-row KV cache), allocated on first use. Entries own arbitrary pool slots (the
context is gathered slot by slot, so there is no fragmentation); when a new entry needs room
the least recently used entries are dropped. An entry that extends an older one of the same
key replaces it (a conversation keeps one entry, its latest turn; a prompt's entry gives way to
its row's when the row ends). One copy never makes room by dropping an entry it is writing
itself (the two would share pool slots in one scatter): such a sequence is not kept.

A row is kept when its last token is fetched, while it still owns its decode row. A row that
ends by ``max_tokens`` is known to end before that fetch, so the run fetches the step in
flight before refilling or dropping such a row (``ContinuousRun._settle``): it is kept too.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from tx_engine import step as programs
from tx_engine.layers.attention import KVCache
from tx_engine.sampling.buckets import context_bucket, pow2

__all__ = ["MIN_PREFIX_TOKENS", "Match", "PrefixCache", "head"]

MIN_PREFIX_TOKENS = 16  # shorter common prefixes are cheaper to prefill again than to gather


@dataclass(frozen=True)
class Match:
    """A prompt's reusable prefix: the first ``context`` pool slots of entry ``entry``; the
    other ``len(prompt) - context`` tokens are prefilled in bucket ``suffix_t``."""

    entry: int
    context: int
    suffix_t: int


@dataclass
class _Entry:
    key: Hashable
    tokens: np.ndarray  # int32: the sequence whose keys/values the pool slots hold, in order
    slots: np.ndarray  # int32 pool slots, one per token


class PrefixCache:
    """Prompts' and finished sequences' keys/values in one ``capacity``-token device pool (LRU)."""

    def __init__(self, capacity: int, min_prompt_bucket: int = 16) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"prefix cache capacity must be an int >= 1, got {capacity!r}")
        self.capacity, self.min_prompt_bucket = capacity, min_prompt_bucket
        self.pool: KVCache | None = None
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._by_head: dict[tuple[Hashable, bytes], set[int]] = {}
        self._free = list(range(capacity - 1, -1, -1))  # a stack of free pool slots
        self._next_id = 0
        self.hits = self.reused_tokens = self.saved = 0

    # ----------------------------------------------------------------- lookup
    def match(self, key: Hashable, prompt: np.ndarray, prompt_t: int) -> Match | None:
        """The longest reusable prefix of ``prompt`` (bucket ``prompt_t``) under ``key``.

        At least one prompt token is always left to prefill: its logits give token 0.
        """
        if len(prompt) <= MIN_PREFIX_TOKENS:
            return None
        best, best_id = 0, -1
        for eid in self._by_head.get((key, head(prompt)), ()):
            common = _common_prefix(self._entries[eid].tokens, prompt)
            if common > best:
                best, best_id = common, eid
        sizes = self._sizes(best, prompt, prompt_t)
        return None if sizes is None else Match(best_id, *sizes)

    def would_reuse(self, kept: np.ndarray, prompt: np.ndarray, prompt_t: int) -> bool:
        """Whether ``prompt`` (bucket ``prompt_t``) would reuse part of ``kept`` once it is
        saved: an admission then waits for that save instead of prefilling the prefix again."""
        common = _common_prefix(kept, prompt) if self._keepable(len(kept)) else 0
        return self._sizes(common, prompt, prompt_t) is not None

    def _sizes(self, common: int, prompt: np.ndarray, prompt_t: int) -> tuple[int, int] | None:
        """The context ``C`` and suffix bucket ``T`` for a ``common``-token shared prefix, if
        worth using and if ``C + T`` fits the prompt's own bucket."""
        if common < MIN_PREFIX_TOKENS:
            return None
        c = context_bucket(common)
        t = pow2(len(prompt) - c, self.min_prompt_bucket)
        return (c, t) if c + t <= prompt_t else None

    def context_slots(self, match: Match) -> np.ndarray:
        """The pool slots of ``match``'s context, in token order."""
        return self._entries[match.entry].slots[: match.context]

    def reuse(self, match: Match) -> None:
        """Count ``match`` as used by an admission, and its entry as the most recent."""
        self._entries.move_to_end(match.entry)
        self.hits += 1
        self.reused_tokens += match.context

    # ----------------------------------------------------------------- saving
    def save(
        self,
        sequences: Sequence[tuple[Hashable, np.ndarray, int]],
        cache: KVCache,
        empty_pool: Callable[[int], KVCache],
    ) -> int:
        """Keep the keys/values of each ``(key, tokens, row)``: ``tokens`` are the first
        unmasked slots of ``cache`` row ``row``. One device copy for all; how many were stored.
        ``empty_pool(n)`` makes the pool."""
        kept: list[tuple[int, np.ndarray]] = []
        fresh: set[int] = set()  # entries of this call: their slots are being written
        for key, tokens, row in sequences:
            eid = self._reserve(key, tokens, fresh)
            if eid is not None:
                fresh.add(eid)
                kept.append((row, self._entries[eid].slots))
        if not kept:
            return 0
        if self.pool is None:
            self.pool = empty_pool(self.capacity)
        rows = np.zeros(pow2(len(kept)), np.int32)
        dst = np.full((len(rows), pow2(max(len(s) for _, s in kept))), self.capacity, np.int32)
        for r, (row, slots) in enumerate(kept):  # out-of-range slots (padding) are dropped
            rows[r], dst[r, : len(slots)] = row, slots
        self.pool = programs.save_prefix(self.pool, cache, jnp.asarray(rows), jnp.asarray(dst))
        self.saved += len(kept)
        return len(kept)

    def _keepable(self, n: int) -> bool:
        """Whether an ``n``-token sequence is kept: long enough to be reused, and fits."""
        return MIN_PREFIX_TOKENS < n <= self.capacity

    def _reserve(self, key: Hashable, tokens: np.ndarray, fresh: set[int]) -> int | None:
        """A new entry for ``tokens`` with free pool slots, or None if it is not worth keeping
        (too short or long, already held) or room would mean dropping an entry in ``fresh``."""
        n = len(tokens)
        if not self._keepable(n):
            return None
        index = (key, head(tokens))
        for eid in list(self._by_head.get(index, ())):
            old = self._entries[eid].tokens
            if len(old) >= n and np.array_equal(old[:n], tokens):
                self._entries.move_to_end(eid)
                return None  # already held, as (a prefix of) a longer entry
            if eid not in fresh and np.array_equal(tokens[: len(old)], old):
                self._drop(eid)  # superseded: every prompt it matches, this one matches too
        while len(self._free) < n:
            oldest = next(iter(self._entries))
            if oldest in fresh:
                return None
            self._drop(oldest)
        slots = np.array([self._free.pop() for _ in range(n)], np.int32)
        eid, self._next_id = self._next_id, self._next_id + 1
        self._entries[eid] = _Entry(key, tokens.astype(np.int32), slots)
        self._by_head.setdefault(index, set()).add(eid)
        return eid

    def _drop(self, eid: int) -> None:
        entry = self._entries.pop(eid)
        self._free.extend(entry.slots.tolist())
        index = (entry.key, head(entry.tokens))
        self._by_head[index].discard(eid)
        if not self._by_head[index]:
            del self._by_head[index]

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def used_tokens(self) -> int:
        return self.capacity - len(self._free)


def _common_prefix(kept: np.ndarray, prompt: np.ndarray) -> int:
    """How many first tokens of ``prompt`` equal ``kept``'s, leaving its last one out (its
    logits give the first sampled token, so it is always prefilled)."""
    n = min(len(kept), len(prompt) - 1)
    same = kept[:n] == prompt[:n]
    return n if same.all() else int(same.argmin())


def head(tokens: np.ndarray) -> bytes:
    """The first :data:`MIN_PREFIX_TOKENS` tokens: only sequences sharing them can share a
    reusable prefix (the index of entries, and of an admission's prompts)."""
    return np.asarray(tokens[:MIN_PREFIX_TOKENS], np.int32).tobytes()
