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
Everything here is host-side bookkeeping; the arithmetic is in ``step.py``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tx_engine import batching, checkpoint, optim, step
from tx_engine.batching import AdapterBatch, DatumArrays, DatumOutput, GroupOutput
from tx_engine.checkpoint import LoraConfig
from tx_engine.config import EngineConfig
from tx_engine.errors import AdapterError, CheckpointError, InputError, NoFreeSlotError
from tx_engine.layers import lora as lora_lib
from tx_engine.loading import load_model, save_hf_weights
from tx_engine.sharding import make_mesh

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

_Spec: Any = PartitionSpec  # jax leaves its constructor untyped
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


class TrainingEngine:
    """Multi-tenant LoRA training over one base model (see the module docstring)."""

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
        self._lora: step.State = parts[1]
        self._rest: step.State = parts[2]
        self._opt = self._place_opt(optim.init_state(self._lora))
        self._grads = self._place_like_lora(step.zeros_like_state(self._lora))
        self._adapters: dict[int, LoraConfig] = {}
        self._static_graphs: dict[int, step.StaticGraph] = {}  # one per rank bucket
        self._groups = {
            ".".join(map(str, path)).removesuffix(".lora"): mod.group
            for path, mod in lora_lib.lora_modules(model)
        }

    def _place_like_lora(self, tree: Any) -> Any:
        """Put a LoRA-shaped tree on the LoRA params' shardings (no-op on one device)."""
        if self._mesh is None:
            return tree
        return jax.device_put(tree, jax.tree.map(lambda x: x.sharding, self._lora))

    def _place_opt(self, opt: optim.OptState) -> optim.OptState:
        if self._mesh is None:
            return opt
        count = jax.device_put(opt.count, NamedSharding(self._mesh, _Spec()))
        return optim.OptState(self._place_like_lora(opt.m), self._place_like_lora(opt.v), count)

    def _place_batch(self, arrays: Mapping[str, Any]) -> Any:
        """Rows split over the data-parallel mesh axes when they divide the batch."""
        if self._mesh is None:
            # One batched transfer: ``jnp.asarray`` per array dispatched a conversion program
            # each (~0.3 ms apiece on an H100 host, half of a 1-token forward's host time).
            return jax.device_put(dict(arrays))
        rows = int(arrays["input_ids"].shape[0])
        data_axes = ("dp", "fsdp")
        ways = int(np.prod([self._mesh.shape[a] for a in data_axes]))
        spec = _Spec(data_axes) if rows % ways == 0 else _Spec()
        return jax.device_put(dict(arrays), NamedSharding(self._mesh, spec))

    # ----------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        return int(self.model_config.vocab_size)

    @property
    def num_slots(self) -> int:
        """Slots including the base slot 0."""
        return int(self._opt.count.shape[0])

    @property
    def adapters(self) -> dict[int, LoraConfig]:
        """Allocated slots and their configs (a copy)."""
        return dict(self._adapters)

    def step_count(self, slot: int) -> int:
        """Optimizer steps taken by ``slot`` since it was created or loaded."""
        self._require(slot)
        return int(self._opt.count[slot])

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
        self._init_slot(free[0], cfg)
        return free[0]

    def free_adapter(self, slot: int) -> None:
        """Release ``slot``: zero its factors, scaling, optimizer moments, count and gradients."""
        self._require(slot)
        model = self._model()
        lora_lib.clear_adapter(model, slot)
        self._resplit(model)
        self._reset_slot_state(slot)
        del self._adapters[slot]

    def _init_slot(self, slot: int, cfg: LoraConfig) -> None:
        model = self._model()
        lora_lib.init_adapter(
            model,
            slot,
            rank=cfg.rank,
            alpha=cfg.alpha,
            seed=cfg.seed,
            train_attn=cfg.train_attn,
            train_mlp=cfg.train_mlp,
            train_unembed=cfg.train_unembed,
        )
        self._resplit(model)
        self._reset_slot_state(slot)
        self._adapters[slot] = cfg

    def _reset_slot_state(self, slot: int) -> None:
        self._opt = optim.reset_slot(self._opt, slot)
        self._grads = jax.tree.map(lambda g: g.at[slot].set(0), self._grads)

    def _model(self) -> nnx.Module:
        return nnx.merge(self._graphdef, self._lora, self._rest)  # type: ignore[no-any-return]

    def _resplit(self, model: nnx.Module) -> None:
        # Keep the original graphdef: jit caches key on it, and the structure never changes.
        parts: tuple[Any, ...] = nnx.split(model, lora_lib.LoRAParam, ...)
        self._lora, self._rest = parts[1], parts[2]

    def graphdef_for_slots(self, slots: Iterable[int]) -> step.StaticGraph:
        """The graphdef that computes a batch whose rows use ``slots`` at its rank bucket.

        Pass it instead of the full-rank graphdef with this engine's ``lora`` / ``rest`` to any
        program of :mod:`tx_engine.step`: LoRA runs at the power-of-two bucket of the largest
        rank among ``slots`` (0 / base rows count as rank 0), so rank-8 tenants pay for rank 8
        whatever ``max_lora_rank`` is. One graphdef (one compiled program) per bucket, wrapped
        once in a :class:`step.StaticGraph` so that dispatching with it hashes nothing.
        """
        return self._static_graph_at(self._rank_for_slots(slots))

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
        """
        chosen = sorted(self._adapters)
        size = min(self.num_slots, 1 << max(0, len(chosen) - 1).bit_length())
        chosen += [s for s in range(self.num_slots) if s not in self._adapters][
            : size - len(chosen)
        ]
        return np.asarray(chosen, np.int32)

    def _require(self, slot: int) -> None:
        if slot not in self._adapters:
            raise AdapterError(f"slot {slot} is not an allocated adapter")

    # ----------------------------------------------------------------- compute
    def forward(self, groups: Sequence[AdapterBatch]) -> list[GroupOutput]:
        """Loss outputs per group without touching gradients; ``slot=None`` is the base model."""
        return self._run(groups, backward=False)

    def forward_backward(self, groups: Sequence[AdapterBatch]) -> list[GroupOutput]:
        """Loss outputs per group; each group's gradient is added to its slot's accumulator."""
        return self._run(groups, backward=True)

    def _run(self, groups: Sequence[AdapterBatch], backward: bool) -> list[GroupOutput]:
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
                pending.append((mb.rows, self._dispatch(mb.arrays, loss_fn, backward)))
        fetched = [
            (rows_, jax.device_get((o.logprobs, o.elementwise_loss, o.metrics["loss:sum"])))
            for rows_, o in pending
        ]
        return batching.unpack(fetched, [len(g.data) for g in groups])

    def _dispatch(self, arrays: Mapping[str, Any], loss_fn: str, backward: bool) -> Any:
        present = np.unique(np.asarray(arrays["adapter_indices"]))
        rank = self._rank_for_slots(present)
        graphdef = self._static_graph_at(rank)
        batch = self._place_batch(arrays)
        chunk = self.config.logits_chunk_tokens
        if not backward:
            return step.forward(
                graphdef, self._lora, self._rest, batch, loss_fn=loss_fn, logits_chunk=chunk
            )
        out, self._grads = step.forward_backward(
            graphdef, self._lora, self._rest, self._grads, batch, loss_fn, chunk, rank=rank
        )
        return out

    # ----------------------------------------------------------------- optimizer
    def optim_step(self, slot: int, adam_params: AdamParams | None = None) -> dict[str, float]:
        """One AdamW step of ``slot`` on its accumulated gradients, which are then cleared."""
        return self.optim_steps({slot: adam_params or AdamParams()})[slot]

    def optim_steps(self, params: Mapping[int, AdamParams]) -> dict[int, dict[str, float]]:
        """Step several slots in one compiled call; other slots are left bit-for-bit unchanged."""
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
        self._lora, self._opt, self._grads, metrics = step.apply_update(
            self._lora,
            self._opt,
            self._grads,
            hyper,
            mask,
            slots,
            rank=self._rank_for_slots(params),
        )
        host = jax.device_get(metrics._asdict())
        counts = np.asarray(self._opt.count)
        where = {slot: i for i, slot in enumerate(slots.tolist())}
        return {
            slot: {
                **{k: float(v[where[slot]]) for k, v in host.items()},
                "step": float(counts[slot]),
            }
            for slot in params
        }

    # ----------------------------------------------------------------- checkpoints
    def save_adapter(self, slot: int, path: str | Path, include_optimizer: bool = True) -> None:
        """Write ``slot``'s weights (and moments) as a rank-trimmed, slot-independent checkpoint."""
        checkpoint.save_adapter(path, self.adapter_state(slot, include_optimizer))

    def adapter_state(self, slot: int, include_optimizer: bool = True) -> checkpoint.AdapterState:
        """``slot``'s weights (and moments) as host arrays: what :meth:`save_adapter` writes."""
        return self.adapter_state_later(slot, include_optimizer)()

    def adapter_state_later(
        self, slot: int, include_optimizer: bool = True
    ) -> Callable[[], checkpoint.AdapterState]:
        """Cut ``slot`` out of the state now; the returned function copies it to the host.

        The cut is one dispatched device computation per tree whose outputs are new buffers, so
        the engine may run its next steps (which donate the full state) before the copy: the
        server's recovery snapshots copy and write in a background thread, off the step's path.
        """
        self._require(slot)
        cfg = self._adapters[slot]
        trees = (self._lora, self._opt.count) + (
            (self._opt.m, self._opt.v) if include_optimizer else ()
        )
        cut = step.take_slot(trees, jnp.int32(slot))  # one dispatch for everything

        def to_host() -> checkpoint.AdapterState:
            weights, count, *moments = jax.device_get(cut)
            host_moments = None
            if moments:
                host_moments = {
                    f"{k}/{n}": a
                    for k, tree in zip(("m", "v"), moments, strict=True)
                    for n, a in checkpoint.trimmed(tree, cfg.rank).items()
                }
            factors = checkpoint.trimmed(weights, cfg.rank)
            return checkpoint.AdapterState(cfg, factors, host_moments, int(count))

        return to_host

    def load_adapter(
        self, path: str | Path, slot: int | None = None, with_optimizer: bool = True
    ) -> int:
        """Load a checkpoint into ``slot`` (a fresh one if None); return the slot.

        Without optimizer state the moments and step count start from zero. Pending gradients
        of the slot are dropped: they belonged to the weights being replaced.
        """
        state = checkpoint.load_adapter(path, with_optimizer=with_optimizer)
        cfg = state.lora_config
        if cfg.rank > self.config.max_lora_rank:
            raise AdapterError(
                f"checkpoint rank {cfg.rank} exceeds max_lora_rank {self.config.max_lora_rank}"
            )
        checkpoint.check_fits(self._lora, state.factors, "adapter weights", cfg.rank)
        moments = None
        if state.moments is not None:
            moments = _split_moments(state.moments)
            checkpoint.check_fits(self._opt.m, moments[0], "optimizer m", cfg.rank)
            checkpoint.check_fits(self._opt.v, moments[1], "optimizer v", cfg.rank)
        if slot is None:
            slot = self.create_adapter(
                cfg.rank, cfg.alpha, cfg.seed, cfg.train_attn, cfg.train_mlp, cfg.train_unembed
            )
        else:
            if not 1 <= slot < self.num_slots:
                raise AdapterError(f"slot must be in [1, {self.num_slots - 1}], got {slot}")
            self._init_slot(slot, cfg)
        self._lora = checkpoint.place_slot(self._lora, slot, state.factors, "adapter weights")
        if moments is not None:
            m, v = moments
            self._opt = optim.OptState(
                checkpoint.place_slot(self._opt.m, slot, m, "optimizer m"),
                checkpoint.place_slot(self._opt.v, slot, v, "optimizer v"),
                self._opt.count.at[slot].set(state.step),
            )
        return slot

    def export_peft(self, slot: int, path: str | Path, base_model_name: str | None = None) -> None:
        """Write ``slot`` as a Hugging Face PEFT LoRA directory (for vLLM / PEFT samplers).

        ``base_model_name`` goes to ``base_model_name_or_path`` (default: the model directory).
        """
        self._require(slot)
        cfg = self._adapters[slot]
        flags = {"attn": cfg.train_attn, "mlp": cfg.train_mlp, "unembed": cfg.train_unembed}
        enabled = {module: flags[group] for module, group in self._groups.items()}
        factors = checkpoint.extract_slot(self._lora, slot, cfg.rank)
        name = base_model_name or str(self.model_dir)
        checkpoint.write_peft(path, factors, enabled, cfg, name)

    def export_merged(self, slot: int, path: str | Path) -> None:
        """Write base + ``slot``'s LoRA merged (``W + (α/r)·A·B``) as a plain HF checkpoint.

        Tokenizer and generation files are copied from the base model directory so the result
        loads on its own. A tied-embedding model cannot absorb an ``lm_head`` LoRA (the
        embedding would change too): such an adapter raises :class:`AdapterError`.
        """
        self._require(slot)
        save_hf_weights(self._model(), path, merge_slot=slot)  # type: ignore[arg-type]
        for src in self.model_dir.iterdir():
            if src.is_file() and (src.name.startswith("tokenizer") or src.name in _SIDE_FILES):
                shutil.copy2(src, Path(path) / src.name)


_SIDE_FILES = frozenset(
    {
        "generation_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
    }
)


def _split_moments(
    moments: Mapping[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    m = {k[2:]: v for k, v in moments.items() if k.startswith("m/")}
    v = {k[2:]: v for k, v in moments.items() if k.startswith("v/")}
    if len(m) + len(v) != len(moments):
        bad = sorted(k for k in moments if not k.startswith(("m/", "v/")))
        raise CheckpointError(f"optimizer.safetensors has unexpected keys {bad}")
    return m, v
