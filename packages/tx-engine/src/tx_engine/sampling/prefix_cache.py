"""Prefix cache: keys/values of finished sequences, reused when a later prompt extends them.

Multi-turn sampling (an RL agent's episode, a chat) sends each turn's prompt as the previous
turn's prompt + its completion + the new message. Without a cache every turn prefills the whole
conversation again: turn ``k`` costs ``O(k)`` prefill and an episode ``O(k²)``. Here, when a
sampled row ends, the keys/values it computed (its prompt and every token it fed back, i.e. all
its tokens but the last) are copied into a device *pool* (:func:`tx_engine.step.save_prefix`);
a later prompt whose first tokens equal an entry's takes the first ``C`` of them as context
and prefills only the rest (:func:`tx_engine.step.admit` with ``context_pc``).

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
key replaces it (a conversation keeps one entry, its latest turn).

A row is kept when its last token is fetched, while it still owns its decode row. A row that
ends by ``max_tokens`` is known to end before that fetch, so the run fetches the step in
flight before refilling or dropping such a row (``ContinuousRun._settle``): it is kept too.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from tx_engine import step as programs
from tx_engine.layers.attention import KVCache
from tx_engine.sampling.buckets import context_bucket, pow2

__all__ = ["MIN_PREFIX_TOKENS", "Match", "PrefixCache"]

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
    """Finished sequences' keys/values in one ``capacity``-token device pool (LRU)."""

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
        for eid in self._by_head.get((key, _head(prompt)), ()):
            tokens = self._entries[eid].tokens
            n = min(len(tokens), len(prompt) - 1)
            same = tokens[:n] == prompt[:n]
            common = n if same.all() else int(same.argmin())
            if common > best:
                best, best_id = common, eid
        if best < MIN_PREFIX_TOKENS:
            return None
        c = context_bucket(best)
        t = pow2(len(prompt) - c, self.min_prompt_bucket)
        return Match(best_id, c, t) if c + t <= prompt_t else None

    def context_slots(self, match: Match) -> np.ndarray:
        """The pool slots of ``match``'s context, in token order; marks the entry as used."""
        self._entries.move_to_end(match.entry)
        self.hits += 1
        self.reused_tokens += match.context
        return self._entries[match.entry].slots[: match.context]

    # ----------------------------------------------------------------- saving
    def save(
        self,
        key: Hashable,
        tokens: np.ndarray,
        cache: KVCache,
        row: int,
        empty_pool: Callable[[int], KVCache],
    ) -> bool:
        """Keep the keys/values of ``tokens`` (the first unmasked slots of ``cache`` row
        ``row``) under ``key``; whether it was stored. ``empty_pool(n)`` makes the pool."""
        n = len(tokens)
        if n <= MIN_PREFIX_TOKENS or n > self.capacity:
            return False
        head = (key, _head(tokens))
        for eid in list(self._by_head.get(head, ())):
            old = self._entries[eid].tokens
            if len(old) >= n and np.array_equal(old[:n], tokens):
                self._entries.move_to_end(eid)
                return False  # already held, as (a prefix of) a longer entry
            if np.array_equal(tokens[: len(old)], old):
                self._drop(eid)  # superseded: every prompt it matches, this one matches too
        while len(self._free) < n:
            self._drop(next(iter(self._entries)))
        slots = np.array([self._free.pop() for _ in range(n)], np.int32)
        if self.pool is None:
            self.pool = empty_pool(self.capacity)
        dst = np.full(pow2(n), self.capacity, np.int32)  # out of range: dropped
        dst[:n] = slots
        self.pool = programs.save_prefix(self.pool, cache, jnp.asarray(row, jnp.int32), dst)
        eid, self._next_id = self._next_id, self._next_id + 1
        self._entries[eid] = _Entry(key, tokens.astype(np.int32), slots)
        self._by_head.setdefault(head, set()).add(eid)
        self.saved += 1
        return True

    def _drop(self, eid: int) -> None:
        entry = self._entries.pop(eid)
        self._free.extend(entry.slots.tolist())
        head = (entry.key, _head(entry.tokens))
        self._by_head[head].discard(eid)
        if not self._by_head[head]:
            del self._by_head[head]

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def used_tokens(self) -> int:
        return self.capacity - len(self._free)


def _head(tokens: np.ndarray) -> bytes:
    """The first :data:`MIN_PREFIX_TOKENS` tokens: only entries sharing them can match."""
    return np.asarray(tokens[:MIN_PREFIX_TOKENS], np.int32).tobytes()
