"""The stateful training facade: one base model, many LoRA tenants, their optimizer state.

A :class:`TrainingEngine` owns the model split into ``graphdef`` / ``lora`` / ``rest`` (see
:mod:`tx_engine.step`), one AdamW state and one gradient accumulator, all with a leading
adapter-slot axis. Slot 0 is the base model (``slot=None`` in requests); slots
``1..max_lora_adapters`` are handed out by :meth:`TrainingEngine.create_adapter`.

Requests are lists of :class:`~tx_engine.batching.AdapterBatch` (one per tenant). One call packs
the rows of *all* its groups into shared micro-batches — one compiled call per micro-batch and
loss function — so tenants are batched together; gradients land in each tenant's slot of the
accumulator and wait there, summed across calls, until that tenant's :meth:`optim_step`.
Each micro-batch runs at the rank bucket of the tenants in it (:meth:`graphdef_for_slots`), so a
rank-8 tenant costs rank-8 compute whatever ``max_lora_rank`` is.
On a device mesh (``EngineConfig.mesh_*``) the engine declares once, from the logical-axis
rules, where LoRA factors, moments, accumulator and batch rows live
(:class:`~tx_engine.sharding.TrainShardings`) and hands that to every training program, which
pins its outputs to it; on one device nothing of this exists.
Everything here is host-side bookkeeping; the arithmetic is in :mod:`tx_engine.step`, the
checkpoint methods in :mod:`tx_engine.engine_checkpoints`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from tx_engine import batching, optim, slot_programs, step
from tx_engine.batching import AdapterBatch, DatumArrays, DatumOutput, GroupOutput
from tx_engine.checkpoint import LoraConfig
from tx_engine.config import EngineConfig
from tx_engine.engine_checkpoints import AdapterCheckpoints
from tx_engine.errors import AdapterError, InputError, NoFreeSlotError
from tx_engine.layers import lora as lora_lib
from tx_engine.loading import load_model
from tx_engine.sharding import TrainShardings, logical_to_pspec, make_mesh
from tx_engine.step.flat_state import FlatState, Held, HeldAttribute

__all__ = [
    "AdamParams",
    "AdapterBatch",
    "DatumArrays",
    "DatumOutput",
    "GroupOutput",
    "InputError",
    "LoraConfig",
    "NoFreeSlotError",
    "TrainingEngine",
]

DEFAULT_LORA_ALPHA = 32.0  # not on the Tinker wire; SkyRL's choice, see the wire spec §6.12


@dataclass(frozen=True)
class AdamParams:
    """Tinker ``AdamParams`` (torch AdamW semantics; ``grad_clip_norm`` 0 disables clipping)."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    def __post_init__(self) -> None:
        checks = {
            "learning_rate": self.learning_rate >= 0,
            "beta1": 0 <= self.beta1 < 1,
            "beta2": 0 <= self.beta2 < 1,
            "eps": self.eps >= 0,
            "weight_decay": self.weight_decay >= 0,
            "grad_clip_norm": np.isfinite(self.grad_clip_norm),
        }
        for name, ok in checks.items():
            value = getattr(self, name)
            if not ok or not np.isfinite(value):
                raise InputError(f"adam_params.{name} is out of range: {value!r}")


class TrainingEngine(AdapterCheckpoints):
    """Multi-tenant LoRA training over one base model (see the module docstring)."""

    # The model's pieces and the optimizer's trees, read and assigned as nnx states anywhere;
    # the per-request programs read and assign their flat side (``_held_lora.flat``, ...):
    # see :mod:`tx_engine.step.flat_state` for what that saves per dispatch.
    _lora = HeldAttribute()
    _rest = HeldAttribute()
    _grads = HeldAttribute()
    _opt = HeldAttribute()
    _held_lora: Held
    _held_rest: Held
    _held_grads: Held
    _held_opt: Held

    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        mesh = None
        if self.config.mesh_shape != (1, 1, 1, 1):
            mesh = make_mesh(*self.config.mesh_shape)
        self.model_dir = Path(model_dir)
        model, self.model_config = load_model(
            self.model_dir,
            dtype=jnp.dtype(self.config.dtype),
            param_dtype=jnp.dtype(self.config.dtype),
            max_lora_adapters=self.config.max_lora_adapters + 1,  # + the base slot 0
            max_lora_rank=self.config.max_lora_rank,
            mesh=mesh,
            remat=self.config.remat,
        )
        self._mesh = mesh
        parts: tuple[Any, ...] = nnx.split(model, lora_lib.LoRAParam, ...)
        self._graphdef: nnx.GraphDef[Any] = parts[0]
        self._lora, self._rest = parts[1], parts[2]
        self._layout = slot_programs.SlotLayout.of(model, self._lora, self._rest)
        # Declared once from the logical-axis rules; the programs pin their outputs to it.
        self._shardings = None if mesh is None else TrainShardings(mesh, self._lora)
        self._opt = optim.init_state(self._lora)
        self._grads = step.zeros_like_state(self._lora)
        self._pin_state()
        self._adapters: dict[int, LoraConfig] = {}
        # Bumped whenever a slot's weights change (init, load, free, optimizer step): what a
        # cache of values computed with a slot (the sampler's prefix cache) is keyed by.
        self._slot_versions = [0] * self.num_slots
        self._static_graphs: dict[int, step.StaticGraph] = {}  # one per rank bucket
        self._groups = {
            ".".join(map(str, path)).removesuffix(".lora"): mod.group
            for path, mod in lora_lib.lora_modules(model)
        }

    def _pin_state(self) -> None:
        """Put LoRA params, moments and accumulator on their declared shardings.

        Slot bookkeeping (:meth:`create_adapter`, :meth:`load_adapter`, ...) edits them in its
        own programs (:mod:`tx_engine.slot_programs`), whose outputs are placed as XLA chose;
        re-pinning keeps the programs' input shardings fixed, so they never recompile. A no-op
        on one device and for arrays already in place.
        """
        sh = self._shardings
        if sh is None:
            return
        self._lora = jax.device_put(self._lora, sh.lora)
        self._grads = jax.device_put(self._grads, sh.grads)
        m, v, count = jax.device_put(
            (self._opt.m, self._opt.v, self._opt.count), (sh.lora, sh.lora, sh.opt_count)
        )
        self._opt = optim.OptState(m, v, count)

    def _place_batch(self, arrays: Mapping[str, Any]) -> Any:
        """Rows split by the ``batch`` logical axis (dp + fsdp) when they divide the batch."""
        if self._mesh is None:
            # The host arrays as they are: the compiled call transfers them in C++.
            # ``jnp.asarray`` per array dispatched a conversion program each (~0.3 ms apiece
            # on an H100 host), and one batched ``jax.device_put`` still cost 0.2 of a 1-token
            # forward's 1.16 ms on the tiny model (2 CPU cores).
            return dict(arrays)
        rows = int(arrays["input_ids"].shape[0])
        spec = logical_to_pspec(("batch",), self._mesh, shape=(rows,))
        return jax.device_put(dict(arrays), NamedSharding(self._mesh, spec))

    # ----------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        return int(self.model_config.vocab_size)

    @property
    def num_slots(self) -> int:
        """Slots including the base slot 0."""
        return int(self._held_opt.flat.count.shape[0])  # the flat side: no states built

    @property
    def adapters(self) -> dict[int, LoraConfig]:
        """Allocated slots and their configs (a copy)."""
        return dict(self._adapters)

    def step_count(self, slot: int) -> int:
        """Optimizer steps taken by ``slot`` since it was created or loaded."""
        self._require(slot)
        return int(self._held_opt.flat.count[slot])

    def slot_version(self, slot: int) -> int:
        """A number that changes whenever ``slot``'s weights do (the base slot's never do)."""
        return self._slot_versions[slot]

    def _weights_changed(self, slots: Iterable[int]) -> None:
        for slot in slots:
            self._slot_versions[slot] += 1

    # ----------------------------------------------------------------- slots
    def create_adapter(
        self,
        rank: int,
        alpha: float | None = None,
        seed: int | None = None,
        train_attn: bool = True,
        train_mlp: bool = True,
        train_unembed: bool = True,
    ) -> int:
        """Allocate the lowest free slot as a fresh rank-``rank`` adapter; return its index."""
        slot, cfg = self._claim_slot(rank, alpha, seed, train_attn, train_mlp, train_unembed)
        self._init_slot(slot, cfg)
        return slot

    def _claim_slot(
        self,
        rank: int,
        alpha: float | None,
        seed: int | None,
        train_attn: bool,
        train_mlp: bool,
        train_unembed: bool,
    ) -> tuple[int, LoraConfig]:
        """The lowest free slot and the checked config of an adapter for it (nothing written)."""
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise AdapterError(f"rank must be an int, got {rank!r}")
        if not 1 <= rank <= self.config.max_lora_rank:
            raise AdapterError(
                f"rank must be in [1, {self.config.max_lora_rank}] (max_lora_rank), got {rank}"
            )
        if not (train_attn or train_mlp or train_unembed):
            raise AdapterError("at least one of train_attn/train_mlp/train_unembed must be true")
        free = [s for s in range(1, self.num_slots) if s not in self._adapters]
        if not free:
            raise NoFreeSlotError(
                f"all {self.num_slots - 1} adapter slots are in use (max_lora_adapters)"
            )
        seed = int.from_bytes(os.urandom(4), "little") if seed is None else int(seed)
        cfg = LoraConfig(
            rank,
            DEFAULT_LORA_ALPHA if alpha is None else float(alpha),
            seed,
            train_attn,
            train_mlp,
            train_unembed,
        )
        return free[0], cfg

    def free_adapter(self, slot: int) -> None:
        """Release ``slot``: zero its factors, scaling, optimizer moments, count and gradients."""
        self._require(slot)
        lora, rest = self._held_lora.flat, self._held_rest.flat
        factors, scalings = slot_programs.zero_slot(
            (lora.leaves, self._layout.scalings(rest.leaves)), np.int32(slot)
        )
        self._set_weights(factors, scalings)
        self._reset_slot_state(slot)
        self._pin_state()
        self._weights_changed([slot])
        del self._adapters[slot]

    def _slot_scalings(self, cfg: LoraConfig) -> tuple[np.float32, ...]:
        """Each LoRA module's scaling in a slot holding ``cfg``: ``alpha / rank`` on the groups
        it targets, 0 on the others (module order, as :class:`slot_programs.SlotLayout`)."""
        if cfg.alpha <= 0:
            raise AdapterError(f"alpha must be > 0, got {cfg.alpha}")
        on = {"attn": cfg.train_attn, "mlp": cfg.train_mlp, "unembed": cfg.train_unembed}
        scale = np.float32(cfg.alpha / cfg.rank)
        return tuple(scale if on[g] else np.float32(0.0) for g in self._layout.groups)

    def _init_slot(self, slot: int, cfg: LoraConfig) -> None:
        lora, rest = self._held_lora.flat, self._held_rest.flat
        factors, scalings = slot_programs.fresh_adapter(
            lora.leaves,
            self._layout.scalings(rest.leaves),
            np.int32(slot),
            jax.random.key(cfg.seed),
            np.int32(cfg.rank),
            self._slot_scalings(cfg),
            layout=self._layout,
        )
        self._set_weights(factors, scalings)
        self._reset_slot_state(slot)
        self._pin_state()
        self._weights_changed([slot])
        self._adapters[slot] = cfg

    def _install_slot(
        self,
        slot: int,
        cfg: LoraConfig,
        factors: tuple[np.ndarray, ...],
        moments: tuple[np.ndarray, ...] | None,
        step: int,
    ) -> None:
        """Put a loaded adapter in ``slot``: ``factors`` (one per ``lora`` leaf), ``cfg``'s
        scalings, and ``moments`` (the ``m`` leaves, then ``v``'s) at ``step``, or a fresh
        optimizer state; no pending gradients. Nothing is drawn (:meth:`_init_slot` would
        draw an ``A`` only to overwrite it)."""
        lora, rest, index = self._held_lora.flat, self._held_rest.flat, np.int32(slot)
        n = len(lora.leaves)
        written = slot_programs.set_slot(
            (*lora.leaves, *self._layout.scalings(rest.leaves)),
            index,
            (*factors, *self._slot_scalings(cfg)),
        )
        self._set_weights(written[:n], written[n:])
        if moments is None:
            self._reset_slot_state(slot)
        else:
            opt, grads = self._held_opt.flat, self._held_grads.flat
            k = len(opt.m.leaves)
            state = slot_programs.set_slot(
                (*opt.m.leaves, *opt.v.leaves, opt.count), index, (*moments, np.int32(step))
            )
            (g,) = slot_programs.zero_slot((grads.leaves,), index)
            m, v = FlatState(state[:k], opt.m.spec), FlatState(state[k:-1], opt.v.spec)
            self._opt = Held(flat=optim.OptState(m, v, state[-1]))
            self._grads = Held(flat=FlatState(g, grads.spec))
        self._pin_state()
        self._weights_changed([slot])
        self._adapters[slot] = cfg

    def _set_weights(self, factors: slot_programs.Leaves, scalings: slot_programs.Leaves) -> None:
        """Hold new LoRA factors (all of ``lora``'s leaves) and module scalings."""
        lora, rest = self._held_lora.flat, self._held_rest.flat
        self._lora = Held(flat=FlatState(factors, lora.spec))
        self._rest = Held(
            flat=FlatState(self._layout.with_scalings(rest.leaves, scalings), rest.spec)
        )

    def _reset_slot_state(self, slot: int) -> None:
        opt, grads = self._held_opt.flat, self._held_grads.flat
        m, v, count, g = slot_programs.zero_slot(
            (opt.m.leaves, opt.v.leaves, (opt.count,), grads.leaves), np.int32(slot)
        )
        self._opt = Held(
            flat=optim.OptState(FlatState(m, opt.m.spec), FlatState(v, opt.v.spec), count[0])
        )
        self._grads = Held(flat=FlatState(g, grads.spec))

    def flat_model_state(self) -> tuple[FlatState, FlatState]:
        """``lora`` and ``rest`` flat, as the engine holds them, for a caller that dispatches
        programs per token (a sampling run): nothing is flattened or rebuilt for it."""
        return self._held_lora.flat, self._held_rest.flat

    def _model(self) -> nnx.Module:
        return nnx.merge(self._graphdef, self._lora, self._rest)  # type: ignore[no-any-return]

    def graphdef_for_slots(
        self, slots: Iterable[int], *, keep_lora: bool = False
    ) -> step.StaticGraph:
        """The graphdef that computes a batch whose rows use ``slots`` at its rank bucket.

        Pass it instead of the full-rank graphdef with this engine's ``lora`` / ``rest`` to any
        program of :mod:`tx_engine.step`: LoRA runs at the power-of-two bucket of the largest
        rank among ``slots`` (0 / base rows count as rank 0), so rank-8 tenants pay for rank 8
        whatever ``max_lora_rank`` is, and a batch of base rows only has no LoRA terms at all.
        ``keep_lora``: keep them anyway, at the smallest bucket (a sampling run that adapter
        rows may join later). One graphdef (one compiled program) per bucket, wrapped once in
        a :class:`step.StaticGraph` so that dispatching with it hashes nothing.
        """
        rank = self._rank_for_slots(slots)
        if keep_lora and not rank:
            rank = lora_lib.rank_bucket([1], self.config.max_lora_rank)
        return self._static_graph_at(rank)

    def _rank_for_slots(self, slots: Iterable[int]) -> int:
        ranks = [self._adapters[s].rank for s in {int(s) for s in slots} if s in self._adapters]
        return lora_lib.rank_bucket(ranks, self.config.max_lora_rank)

    def _static_graph_at(self, rank: int) -> step.StaticGraph:
        graph = self._static_graphs.get(rank)
        if graph is None:
            graphdef = lora_lib.graphdef_at_rank(self._graphdef, self._lora, self._rest, rank=rank)
            graph = self._static_graphs[rank] = step.StaticGraph(graphdef)
        return graph

    def _live_slots(self) -> np.ndarray:
        """The allocated slots, padded with free ones to a power-of-two count (at most all).

        :func:`step.apply_update` reads and writes only these slots (at the stepped adapters'
        rank bucket), so an optimizer step costs what the live adapters hold, not all
        ``max_lora_adapters`` at ``max_lora_rank``. The program depends on the *count*, not on
        which slots are stepped, so stepping one tenant or several shares it; bucketing the
        count bounds the programs to ``log2(num_slots) + 1`` per rank bucket. Padding slots
        are real, distinct slots that the program leaves unchanged.

        When the allocated slots fit in ``size`` consecutive ones (the usual case: slots are
        handed out lowest first), the padding completes that window, so the step cuts and
        writes each leaf's slots with one slice instead of one per slot
        (:func:`step.apply_update` checks this on the host).
        """
        allocated = sorted(self._adapters)
        size = min(self.num_slots, 1 << max(0, len(allocated) - 1).bit_length())
        if allocated and allocated[-1] - allocated[0] < size:
            start = min(allocated[0], self.num_slots - size)
            return np.arange(start, start + size, dtype=np.int32)
        free = [s for s in range(self.num_slots) if s not in self._adapters]
        return np.asarray(sorted(allocated + free[: size - len(allocated)]), np.int32)

    def _require(self, slot: int) -> None:
        if slot not in self._adapters:
            raise AdapterError(f"slot {slot} is not an allocated adapter")

    # ----------------------------------------------------------------- compute
    def forward(self, groups: Sequence[AdapterBatch]) -> list[GroupOutput]:
        """Loss outputs per group without touching gradients; ``slot=None`` is the base model."""
        return self.forward_later(groups)()

    def forward_backward(self, groups: Sequence[AdapterBatch]) -> list[GroupOutput]:
        """Loss outputs per group; each group's gradient is added to its slot's accumulator."""
        return self.forward_backward_later(groups)()

    def forward_later(self, groups: Sequence[AdapterBatch]) -> Callable[[], list[GroupOutput]]:
        """:meth:`forward` dispatched now; the returned function fetches its outputs.

        Bad input raises here, before anything runs. Between the two the device computes
        while the caller does host work — the server's worker records the previous call's
        results — and later calls may be dispatched: each fetch waits only for its own call.
        """
        return self._run_later(groups, backward=False)

    def forward_backward_later(
        self, groups: Sequence[AdapterBatch]
    ) -> Callable[[], list[GroupOutput]]:
        """:meth:`forward_backward` dispatched now, fetched later (see :meth:`forward_later`)."""
        return self._run_later(groups, backward=True)

    def _run_later(
        self, groups: Sequence[AdapterBatch], backward: bool
    ) -> Callable[[], list[GroupOutput]]:
        index: dict[int | None, int] = {s: s for s in self._adapters}
        if not backward:
            index[None] = lora_lib.BASE_SLOT
        rows = batching.validate(groups, self.vocab_size, index)
        parts: dict[tuple[str, int], list[batching.Row]] = {}
        for row in rows:
            key = (groups[row.group].loss_fn, batching.target_ndim(row))
            parts.setdefault(key, []).append(row)
        pending = []  # dispatch every micro-batch before fetching any result (async dispatch)
        for (loss_fn, _), part in parts.items():
            for mb_rows in batching.plan(part, self.config):
                mb = batching.pack(mb_rows, self.config, lora_lib.BASE_SLOT)
                out = self._dispatch(mb.arrays, loss_fn, backward)
                pending.append(
                    (mb.rows, (out.logprobs, out.elementwise_loss, out.metrics["loss:sum"]))
                )
        sizes = [len(g.data) for g in groups]

        def fetch() -> list[GroupOutput]:
            fetched = [(rows_, jax.device_get(arrays)) for rows_, arrays in pending]
            return batching.unpack(fetched, sizes)

        return fetch

    def _dispatch(self, arrays: Mapping[str, Any], loss_fn: str, backward: bool) -> Any:
        present = np.unique(np.asarray(arrays["adapter_indices"]))
        rank = self._rank_for_slots(present)
        graphdef = self._static_graph_at(rank)
        batch = self._place_batch(arrays)
        chunk = self.config.logits_chunk_tokens
        sh = self._shardings
        lora, rest = self._held_lora.flat, self._held_rest.flat
        if not backward:
            return step.forward.flat(graphdef, lora, rest, batch, loss_fn, chunk, shardings=sh)
        out, grads = step.forward_backward.flat(
            graphdef, lora, rest, self._held_grads.flat, batch, loss_fn, chunk, rank, sh
        )
        self._grads = Held(flat=grads)
        return out

    # ----------------------------------------------------------------- optimizer
    def optim_step(self, slot: int, adam_params: AdamParams | None = None) -> dict[str, float]:
        """One AdamW step of ``slot`` on its accumulated gradients, which are then cleared."""
        return self.optim_steps({slot: adam_params or AdamParams()})[slot]

    def optim_steps(self, params: Mapping[int, AdamParams]) -> dict[int, dict[str, float]]:
        """Step several slots in one compiled call; other slots are left bit-for-bit unchanged.

        Each slot's metrics: ``grad_norm``, ``update_norm``, ``param_norm``, ``learning_rate``,
        ``step`` and ``skipped``: 1.0 when the slot's gradient or update was not finite, so the
        step was not applied (weights, moments and count unchanged) but its accumulated
        gradient was still consumed (see :mod:`tx_engine.optim`)."""
        return self.optim_steps_later(params)()

    def optim_steps_later(
        self, params: Mapping[int, AdamParams]
    ) -> Callable[[], dict[int, dict[str, float]]]:
        """:meth:`optim_steps` dispatched now; the returned function fetches the metrics
        (see :meth:`forward_later`). Bad input raises here."""
        if not params:
            raise InputError("optim_steps needs at least one slot")
        for slot in params:
            self._require(slot)
        slots = self._live_slots()
        hyper = optim.AdamHyper.defaults(len(slots))
        mask = np.zeros((len(slots),), np.bool_)
        for i, slot in enumerate(slots.tolist()):
            if slot in params:
                hyper = hyper.with_slot(i, **asdict(params[slot]))
                mask[i] = True
        lora, opt, grads, metrics = step.apply_update(
            self._held_lora.flat,
            self._held_opt.flat,
            self._held_grads.flat,
            hyper,
            mask,
            slots,
            rank=self._rank_for_slots(params),
            shardings=self._shardings,
        )
        self._lora, self._opt, self._grads = Held(flat=lora), Held(flat=opt), Held(flat=grads)
        self._weights_changed(params)
        where = {slot: i for i, slot in enumerate(slots.tolist())}

        def fetch() -> dict[int, dict[str, float]]:
            # Only the step's own outputs: later steps donate ``self._opt``'s buffers.
            host = jax.device_get(metrics._asdict())
            return {slot: {k: float(v[where[slot]]) for k, v in host.items()} for slot in params}

        return fetch
