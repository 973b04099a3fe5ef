"""One engine per served base model, and which adapter slot holds which training run.

Slots: training runs take a slot at ``create_model``/``load_weights`` or, after a worker restart,
when first used (:mod:`.recovery`), and give it back when unloaded or their session finishes;
sampler checkpoints fill the remaining slots as an LRU cache (:mod:`.slots`).

More runs than slots: when an engine is full and no sampler slot can go, the least recently
used training run that the current round does not use is *parked*: its recovery snapshot is
brought up to date on disk (:mod:`.snapshots`) and its slot freed. Its next request restores
it the way a restarted worker does (:meth:`EngineHost.get`: the snapshot, then a replay of the
passes it had accumulated since), so parking changes no result, only costs a write and a
load. So ``max_lora_adapters`` bounds the runs of one round (:func:`.rounds.plan_rounds` caps
it), not how many runs may live: tenants whose scripts ended without finishing their session,
or many tenants taking turns, no longer lock newcomers out until their sessions expire.

Engines are built lazily, on the first request for their base model, and kept for the life of
the worker: building one loads the weights and compiles programs, which must happen once, not
per request. A base-model name is a local directory or a hub repo id resolved from the local
Hugging Face cache only (``local_files_only``): the worker never downloads; the server fills the
cache at start (:mod:`tx_server.hub`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tx_engine.compile_cache import enable_compilation_cache
from tx_engine.config import EngineConfig
from tx_engine.engine import TrainingEngine
from tx_engine.errors import NoFreeSlotError
from tx_server.convert import adam_params
from tx_server.db.database import Database
from tx_server.errors import BadRequestError, ServerFaultError
from tx_server.futures import RequestType
from tx_server.hub import hub_cache, local_model_dir
from tx_server.settings import Settings
from tx_server.worker.passes import decode_pass
from tx_server.worker.recovery import Recovery
from tx_server.worker.slots import SamplerSlots
from tx_server.worker.snapshots import SnapshotWriter, snapshot_owners
from tx_server.worker.stored import load_stored
from tx_types import AdamParams, OptimStepRequest

__all__ = ["EngineHost", "LoadedModel", "SlotsBusyError", "create_from_config", "resolve_model_dir"]

log = logging.getLogger(__name__)

ORPHAN_SWEEP_SECONDS = 60.0
"""How often the worker looks on disk for snapshots of runs that are no longer live."""


def resolve_model_dir(name: str) -> Path:
    """The directory holding ``name``'s config and weights (local path or cached hub repo;
    :func:`tx_server.hub.fetch_base_models` filled the cache when the server started)."""
    local = local_model_dir(name)
    if local is not None:
        return local
    import huggingface_hub

    try:
        return Path(
            huggingface_hub.snapshot_download(name, local_files_only=True, cache_dir=hub_cache())
        )
    except Exception as exc:  # the hub client raises several unrelated types here
        raise ServerFaultError(
            f"base model {name!r} is neither a directory nor in the local Hugging Face cache "
            f"({type(exc).__name__}: {exc})"
        ) from None


class SlotsBusyError(BadRequestError):
    """Every slot of an engine holds a training run of the current round or a sampler that a
    running sampling batch reads. Between decode steps that is temporary: the executor runs
    the request after the batch (:mod:`.executor`); otherwise it is the request's error."""


@dataclass
class LoadedModel:
    """A training run that lives in this worker: its engine, adapter slot, unsnapshotted state."""

    base_model: str
    engine: TrainingEngine
    slot: int
    dirty: tuple[str, float] | None = None
    """``(barrier request id, monotonic time of the first unsnapshotted change)``: the state
    changed since its last recovery snapshot was cut; None when the snapshot is current."""
    used_at: float = field(default_factory=time.monotonic)
    """When a request last used the run (which run is parked first)."""


class EngineHost:
    """The worker's engines, which training run holds which slot, and the sampler slot cache.

    Every slot allocation goes through :meth:`allocate`: when an engine is full, the least
    recently used sampler slot is evicted (it reloads from disk), else the least recently used
    training run outside the current round is parked (see the module docstring). Runs are
    released for good when they stop being live (:meth:`sweep`, :meth:`release`).
    """

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.recovery = Recovery(db, settings.checkpoint_root)
        self.samplers = SamplerSlots(self.allocate)
        self.snapshots = SnapshotWriter(settings.checkpoint_root)
        self._engines: dict[str, TrainingEngine] = {}
        self._models: dict[str, LoadedModel] = {}
        self._round: set[str] = set()  # runs the current round uses: never parked
        self._parked: set[str] = set()  # parked here: restoring them is routine, not recovery
        self._orphans_due = 0.0
        if settings.compilation_cache_dir is not None:
            enable_compilation_cache(settings.compilation_cache_dir)

    def engine(self, base_model: str) -> TrainingEngine:
        """The engine of a served base model, built on first use."""
        if base_model not in self.settings.base_models:
            raise BadRequestError(
                f"base_model {base_model!r} is not served; served: {self.settings.base_models}"
            )
        if base_model not in self._engines:
            config = EngineConfig(**self.settings.engine.engine_config_kwargs())
            self._engines[base_model] = TrainingEngine(resolve_model_dir(base_model), config)
            e = self.settings.engine
            log.info(
                "engine for %s: %s, %d adapter slots up to rank %d, mesh dp=%d fsdp=%d tp=%d "
                "ep=%d, %d tokens per micro-batch; sampling: %d KV slots per batch, prefix "
                "cache %d token slots, %d decode steps per dispatch",
                base_model, e.dtype, e.max_lora_adapters, e.max_lora_rank, e.mesh_dp, e.mesh_fsdp,
                e.mesh_tp, e.mesh_ep, e.tokens_per_micro_batch, e.sample_tokens_per_batch,
                e.sample_prefix_cache_tokens, e.sample_decode_chunk,
            )  # fmt: skip
        return self._engines[base_model]

    def allocate(self, base_model: str, make: Callable[[TrainingEngine], int]) -> int:
        """Run ``make`` (which takes a fresh slot) on the engine; if it is full, evict a sampler
        or park a training run first (see the class docstring)."""
        engine = self.engine(base_model)
        while True:
            try:
                return make(engine)
            except NoFreeSlotError:
                if not (self.samplers.evict(base_model, engine) or self._park(base_model)):
                    limit = self.settings.engine.max_lora_adapters
                    raise SlotsBusyError(
                        f"no free adapter slot for {base_model!r}: all {limit} slots "
                        f"(max_lora_adapters={limit}) hold training runs of the current round "
                        "or samplers that a running sampling batch reads; raise "
                        "max_lora_adapters"
                    ) from None

    def begin_round(self, model_ids: set[str]) -> None:
        """The runs a round of training requests uses from now on (none parked meanwhile);
        an empty set once the round's work is collected."""
        self._round = model_ids

    def _park(self, base_model: str) -> bool:
        """Park the least recently used run of ``base_model`` outside the current round:
        bring its snapshot up to date on disk, then free its slot. False if there is none."""
        idle = [
            (loaded.used_at, model_id)
            for model_id, loaded in self._models.items()
            if loaded.base_model == base_model and model_id not in self._round
        ]
        if not idle:
            return False
        model_id = min(idle)[1]
        loaded = self._models[model_id]
        if loaded.dirty is not None:
            self._cut(model_id, loaded, wait=True)
        else:  # its newest cut may still be queued for the writer
            self.snapshots.flush(model_id)
        self.release(model_id)
        self._parked.add(model_id)
        log.info(
            "parked model %s (idle %.1f s) to free slot %d; its next request restores it",
            model_id, time.monotonic() - loaded.used_at, loaded.slot,
        )  # fmt: skip
        return True

    def add(
        self, model_id: str, base_model: str, slot: int, lora: dict[str, Any] | None = None
    ) -> LoadedModel:
        """Record that ``model_id`` now occupies ``slot`` (here and in ``models``)."""
        loaded = LoadedModel(base_model, self.engine(base_model), slot)
        self._models[model_id] = loaded
        self._parked.discard(model_id)
        self.recovery.set_slot(model_id, slot, lora)
        return loaded

    def get(self, model_id: str) -> LoadedModel:
        """The live training run, restored into a slot first if this worker does not hold it
        (after a restart, or parked)."""
        loaded = self._models.get(model_id)
        loaded = loaded if loaded is not None else self._restore(model_id)
        loaded.used_at = time.monotonic()
        return loaded

    def find(self, model_id: str) -> LoadedModel | None:
        """The training run if this worker holds it, or None."""
        loaded = self._models.get(model_id)
        if loaded is not None:
            loaded.used_at = time.monotonic()
        return loaded

    def release(self, model_id: str) -> None:
        """Free ``model_id``'s slot (if held) and record that it holds none."""
        loaded = self._models.pop(model_id, None)
        if loaded is not None:
            loaded.engine.free_adapter(loaded.slot)
        self._parked.discard(model_id)
        self.recovery.set_slot(model_id, None)

    def sweep(self) -> list[str]:
        """Release every held run that is no longer live; drop its snapshots. Returns the ids.

        Runs this worker does not hold (their session ended while no worker held them, e.g.
        across a restart) are found on disk, at most every :data:`ORPHAN_SWEEP_SECONDS`.
        """
        dead = self.recovery.dead(list(self._models))
        for model_id in dead:
            self.release(model_id)
            self.snapshots.drop(model_id)
        if dead:
            log.info("released the adapter slots of %d finished or unloaded runs", len(dead))
        if time.monotonic() >= self._orphans_due:
            self._orphans_due = time.monotonic() + ORPHAN_SWEEP_SECONDS
            unheld = [
                m for m in snapshot_owners(self.settings.checkpoint_root) if m not in self._models
            ]
            for model_id in self.recovery.dead(unheld):
                self.snapshots.drop(model_id)
                self._parked.discard(model_id)
                dead.append(model_id)
        return dead

    def snapshot(self, model_id: str, request_id: str, wait: bool = False) -> None:
        """Record that barrier ``request_id`` changed the run's state (see :mod:`.snapshots`).

        The snapshot is cut from the engine when the worker goes idle (:meth:`cut_snapshots`),
        so a busy worker pays nothing per step; it is cut at once when ``wait`` (barriers a
        restore cannot replay; also waits for the disk) or when the run's state has gone
        unsnapshotted for the writer's ``max_lag``.
        """
        loaded = self.get(model_id)
        since = loaded.dirty[1] if loaded.dirty is not None else time.monotonic()
        loaded.dirty = (request_id, since)
        if wait or time.monotonic() - since >= self.snapshots.max_lag:
            self._cut(model_id, loaded, wait)

    @property
    def snapshots_due(self) -> bool:
        """Whether some held run changed since its last snapshot was cut."""
        return any(loaded.dirty is not None for loaded in self._models.values())

    def cut_snapshots(self) -> int:
        """Cut every changed run's snapshot and queue it for writing (call when idle)."""
        due = [(m, loaded) for m, loaded in self._models.items() if loaded.dirty is not None]
        for model_id, loaded in due:
            self._cut(model_id, loaded)
        return len(due)

    def _cut(self, model_id: str, loaded: LoadedModel, wait: bool = False) -> None:
        assert loaded.dirty is not None
        request_id = loaded.dirty[0]
        state = loaded.engine.adapter_state_later(loaded.slot, include_optimizer=True)
        loaded.dirty = None
        self.snapshots.submit(model_id, request_id, state, wait=wait)

    def close(self) -> None:
        """Cut and write every pending snapshot (call when the worker stops)."""
        self.cut_snapshots()
        self.snapshots.close()

    def _restore(self, model_id: str) -> LoadedModel:
        parked = model_id in self._parked
        plan = self.recovery.plan(model_id)
        if plan.snapshot is not None:
            path = plan.snapshot
            slot = self.allocate(
                plan.base_model, lambda e: load_stored(e, path, slot=None, with_optimizer=True)
            )
        else:
            slot = self.allocate(plan.base_model, lambda e: create_from_config(e, plan.lora))
        loaded = self.add(model_id, plan.base_model, slot)
        try:
            for kind, payload in plan.replay:  # what the dead worker applied after the snapshot
                if kind == RequestType.OPTIM_STEP:
                    body = OptimStepRequest.model_validate_json(payload)
                    assert isinstance(body.optim_params, AdamParams)  # checked when it first ran
                    loaded.engine.optim_step(slot, adam_params(body.optim_params))
                else:
                    decoded = decode_pass(payload, self.settings.engine.max_seq_len)
                    loaded.engine.forward_backward([decoded.batch(slot)])
        except Exception as exc:
            self.release(model_id)
            raise ServerFaultError(
                f"restoring model {model_id!r}: replaying its completed requests failed: {exc}"
            ) from exc
        log.log(
            logging.INFO if parked else logging.WARNING,
            "restored %smodel %s into slot %d (%s, %d requests replayed)",
            "parked " if parked else "",
            model_id,
            slot,
            f"snapshot {plan.snapshot_id}" if plan.snapshot_id else "initial adapter",
            len(plan.replay),
        )
        return loaded


def create_from_config(engine: TrainingEngine, lora: dict[str, Any]) -> int:
    """A fresh adapter from a stored ``lora_config`` (its ``seed`` makes the init repeatable)."""
    return engine.create_adapter(
        rank=int(lora.get("rank", 32)),
        seed=None if lora.get("seed") is None else int(lora["seed"]),
        train_attn=bool(lora.get("train_attn", True)),
        train_mlp=bool(lora.get("train_mlp", True)),
        train_unembed=bool(lora.get("train_unembed", True)),
    )
