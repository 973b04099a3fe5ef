"""Adapter slots that hold sampler checkpoints: a cache, evicted least recently used first.

Why samplers go first: a sampler's weights are files on disk (a sampler checkpoint), so
dropping them costs only a reload, while parking a training run (:mod:`.engines`) writes its
state first and may replay its pending passes when it comes back. When a slot is needed — for
another sampler or for a training run — the least recently used sampler slot not in use goes.
The slots a claim's sampling reads are :meth:`SamplerSlots.pinned` while it runs: neither the
claim's own loads nor training that runs between its decode steps
(:mod:`tx_server.worker.interleave`) evict those.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

from tx_engine.engine import TrainingEngine
from tx_server.worker.stored import load_stored

__all__ = ["Allocate", "SamplerSlots"]

Allocate = Callable[[str, Callable[[TrainingEngine], int]], int]
"""``allocate(base_model, make)``: run ``make`` (which takes a free slot of the base model's
engine) after making room if the engine is full (:meth:`.engines.EngineHost.allocate`)."""


class SamplerSlots:
    """Slots holding sampler checkpoints, one per (base model, checkpoint path).

    A named checkpoint can be overwritten (``overwrite=True``); the cached copy is then stale.
    Each entry remembers the modification time of the checkpoint's ``metadata.json`` (rewritten
    by every save) and is reloaded when it changed.
    """

    def __init__(self, allocate: Allocate) -> None:
        self._allocate = allocate
        self._slots: OrderedDict[tuple[str, str], tuple[int, int]] = OrderedDict()
        self._pinned: list[set[int]] = []

    @contextlib.contextmanager
    def pinned(self, slots: set[int]) -> Iterator[None]:
        """Keep ``slots`` loaded (never evicted or reloaded) until the block ends; the set is
        read live, so slots added to it inside the block are pinned too."""
        self._pinned.append(slots)
        try:
            yield
        finally:
            assert self._pinned.pop() is slots  # blocks nest

    def slot(self, base_model: str, engine: TrainingEngine, path: str) -> int:
        """The slot holding ``path``'s weights, loading them (weights only) on first use."""
        key = (base_model, path)
        stamp = _stamp(path)
        if key in self._slots:
            slot, loaded_stamp = self._slots[key]
            if loaded_stamp == stamp or self._is_pinned(slot):  # pinned: keep a claim consistent
                self._slots.move_to_end(key)
                return slot
            engine.free_adapter(slot)  # stale: the checkpoint was overwritten since
            del self._slots[key]
        slot = self._allocate(
            base_model, lambda e: load_stored(e, path, slot=None, with_optimizer=False)
        )
        self._slots[key] = (slot, stamp)
        return slot

    def evict(self, base_model: str, engine: TrainingEngine) -> bool:
        """Free the least recently used sampler slot of ``base_model`` that is not pinned."""
        for key, (slot, _stamp) in self._slots.items():
            if key[0] == base_model and not self._is_pinned(slot):
                engine.free_adapter(slot)
                del self._slots[key]
                return True
        return False

    def _is_pinned(self, slot: int) -> bool:
        return any(slot in pinned for pinned in self._pinned)

    def held(self, base_model: str) -> list[str]:
        """Checkpoint paths cached for ``base_model``, least recently used first."""
        return [path for (base, path) in self._slots if base == base_model]


def _stamp(path: str) -> int:
    """When the checkpoint at ``path`` was last written (0 if it has no metadata file)."""
    try:
        return (Path(path) / "metadata.json").stat().st_mtime_ns
    except OSError:
        return 0
