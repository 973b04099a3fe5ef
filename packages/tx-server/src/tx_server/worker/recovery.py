"""Restart recovery: which training runs are live, and how to rebuild one after a restart.

A training run's state (adapter weights, AdamW moments, step count, pending gradients) lives in
an adapter slot of the worker's engine, so a worker restart loses it. Design:

* **Exact state = state after the run's last completed state-changing barrier** (``create_model``,
  ``optim_step``, ``load_weights``; the queue runs them one at a time, in order), **plus the
  gradients of the forward/backward passes completed since**.
* **Recovery snapshots.** After every ``optim_step`` and ``load_weights`` — before its future is
  completed — the worker writes the slot's weights *and* optimizer state to
  ``{checkpoint_root}/{model_id}/recovery/{request_id}/`` (via a temporary directory and a
  rename, so a half-written snapshot is never read) and keeps the previous snapshot too. If the
  worker dies between writing and completing, the request is failed at restart and the previous
  snapshot is still the one that matches the last *completed* barrier. Snapshots are not rows in
  ``checkpoints``: they are internal and never listed.
  Chosen over "snapshot when idle": it is never stale, at the cost of one adapter-sized write
  per step (small next to a training step for LoRA ranks).
* **Gradients are replayed, not lost.** Completed ``forward_backward`` payloads are still in the
  ``futures`` table; on restore the worker re-runs those that came after the last barrier (the
  results are discarded), so a resubmitted ``optim_step`` applies exactly the gradients the
  client was told about.
* **Never snapshotted: ``create_model``.** Its state is a deterministic function of the LoRA
  config and seed; the worker records the seed it drew in ``models.lora_config`` at creation.
* **Restore is lazy**: at the first request for the run after a restart (each restored run takes
  a slot, and finished or idle runs need none). ``models.adapter_slot`` is cleared at worker
  start and set whenever a run gets a slot.
* **Live** = the ``models`` row exists, no completed ``unload_model`` request names it (that
  queue row is the durable unload record; pruning keeps it), and its session is not finished.
  Requests for a run that is not live fail with category ``user``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from tx_engine.engine import TrainingEngine
from tx_server.db.database import Database
from tx_server.db.models import FutureRow, FutureStatus, ModelRow, SessionRow
from tx_server.errors import BadRequestError, NotFoundError, ServerFaultError
from tx_server.futures import RequestType

__all__ = ["Recovery", "RestorePlan", "drop_snapshots", "write_snapshot"]

_STATE_CHANGING = (RequestType.CREATE_MODEL, RequestType.OPTIM_STEP, RequestType.LOAD_WEIGHTS)
_RECOVERY = "recovery"


def _snapshots(root: Path, model_id: str) -> Path:
    if "/" in model_id or model_id in ("", ".", ".."):
        raise ServerFaultError(f"model id {model_id!r} cannot name a directory")
    return root / model_id / _RECOVERY


def write_snapshot(
    engine: TrainingEngine, slot: int, root: Path, model_id: str, request_id: str, keep: str | None
) -> None:
    """Snapshot ``slot`` (weights + optimizer) as ``request_id``; keep only it and ``keep``."""
    base = _snapshots(root, model_id)
    tmp = base / f".{request_id}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    engine.save_adapter(slot, tmp, include_optimizer=True)
    shutil.rmtree(base / request_id, ignore_errors=True)
    os.replace(tmp, base / request_id)
    for old in base.iterdir():
        if old.name not in (request_id, keep):
            shutil.rmtree(old, ignore_errors=True)


def drop_snapshots(root: Path, model_id: str) -> None:
    """Delete a run's recovery snapshots (it was unloaded or its session finished)."""
    shutil.rmtree(_snapshots(root, model_id), ignore_errors=True)


@dataclass(frozen=True)
class RestorePlan:
    """How to rebuild a live run: load ``snapshot`` or init from ``lora``, then replay passes."""

    base_model: str
    lora: dict[str, Any]
    snapshot: Path | None
    snapshot_id: str | None
    replay: list[bytes]


class Recovery:
    """Database reads and writes behind restart recovery and slot bookkeeping."""

    def __init__(self, db: Database, checkpoint_root: Path) -> None:
        self.db = db
        self.root = checkpoint_root

    def plan(self, model_id: str) -> RestorePlan:
        """The restore plan of a live run; user errors for unknown or released runs."""
        with self.db.read() as session:
            row = self._live_row(session, model_id)
            last = session.execute(
                select(FutureRow.id, FutureRow.request_id, FutureRow.request_type)
                .where(
                    FutureRow.model_id == model_id,
                    FutureRow.status == FutureStatus.COMPLETED,
                    FutureRow.request_type.in_(_STATE_CHANGING),
                )
                .order_by(FutureRow.id.desc())
                .limit(1)
            ).first()
            if last is None:
                self._check_created(session, model_id)
            replay = list(
                session.scalars(
                    select(FutureRow.payload)
                    .where(
                        FutureRow.model_id == model_id,
                        FutureRow.status == FutureStatus.COMPLETED,
                        FutureRow.request_type == RequestType.FORWARD_BACKWARD,
                        FutureRow.id > (last.id if last is not None else -1),
                    )
                    .order_by(FutureRow.id)
                ).all()
            )
            base_model, lora = row.base_model, dict(row.lora_config)
        snapshot_id = self._snapshot_for(model_id, last)
        snapshot = None if snapshot_id is None else _snapshots(self.root, model_id) / snapshot_id
        return RestorePlan(base_model, lora, snapshot, snapshot_id, replay)

    def _snapshot_for(self, model_id: str, last: Any) -> str | None:
        """The snapshot matching the last completed barrier (None: init from the config)."""
        base = _snapshots(self.root, model_id)
        if last is None:  # its barriers were pruned: the newest snapshot, if any, is the state
            found = sorted(
                (p for p in base.glob("*") if not p.name.startswith(".")),
                key=lambda p: p.stat().st_mtime_ns,
            )
            return found[-1].name if found else None
        if last.request_type == RequestType.CREATE_MODEL:
            return None
        if not (base / last.request_id).is_dir():
            raise ServerFaultError(
                f"the state of model {model_id!r} after request {last.request_id} "
                f"({last.request_type}) was lost with the worker (no recovery snapshot in "
                f"{base}); create a new training client from a saved checkpoint"
            )
        return str(last.request_id)

    def require_live(self, model_id: str) -> str:
        """The base model of a live run; user errors for unknown, unloaded or finished runs."""
        with self.db.read() as session:
            return self._live_row(session, model_id).base_model

    def _live_row(self, session: Session, model_id: str) -> ModelRow:
        row = session.get(ModelRow, model_id)
        if row is None:
            raise NotFoundError(f"unknown model_id {model_id!r}")
        if self._unloaded(session, [model_id]):
            raise BadRequestError(
                f"model {model_id!r} was unloaded (unload_model) and its adapter slot freed; "
                "create a new training client (e.g. from a saved checkpoint)"
            )
        finished = session.get(SessionRow, row.session_id)
        if finished is not None and finished.finished_at is not None:
            raise BadRequestError(
                f"model {model_id!r} belongs to session {row.session_id}, which is finished "
                f"({finished.finish_reason}); its adapter slot was freed"
            )
        return row

    @staticmethod
    def _unloaded(session: Session, model_ids: list[str]) -> set[str]:
        rows = session.scalars(
            select(FutureRow.model_id).where(
                FutureRow.model_id.in_(model_ids),
                FutureRow.request_type == RequestType.UNLOAD_MODEL,
                FutureRow.status == FutureStatus.COMPLETED,
            )
        )
        return {str(m) for m in rows}

    @staticmethod
    def _check_created(session: Session, model_id: str) -> None:
        failed = session.scalar(
            select(FutureRow.error_message).where(
                FutureRow.model_id == model_id,
                FutureRow.request_type.in_(_STATE_CHANGING),
                FutureRow.status == FutureStatus.FAILED,
            )
        )
        if failed is not None:
            raise BadRequestError(f"model {model_id!r} was never created: {failed}")

    def dead(self, model_ids: list[str]) -> list[str]:
        """Those of ``model_ids`` that are no longer live (deleted, unloaded, session finished)."""
        if not model_ids:
            return []
        with self.db.read() as session:
            rows = session.execute(
                select(ModelRow.id, SessionRow.finished_at)
                .join(SessionRow, SessionRow.id == ModelRow.session_id, isouter=True)
                .where(ModelRow.id.in_(model_ids))
            ).all()
            live = {str(i) for i, finished in rows if finished is None}
            live -= self._unloaded(session, sorted(live))
        return [m for m in model_ids if m not in live]

    def set_slot(self, model_id: str, slot: int | None, lora: dict[str, Any] | None = None) -> None:
        """Record ``model_id``'s slot (None: holds none), and its LoRA config with the seed."""
        with self.db.write() as session:
            row = session.get(ModelRow, model_id)
            if row is not None:
                row.adapter_slot = slot
                if lora is not None:
                    row.lora_config = lora

    def clear_slots(self) -> None:
        """A starting worker holds no adapters: no run has a slot until it is restored."""
        with self.db.write() as session:
            session.execute(
                update(ModelRow).where(ModelRow.adapter_slot.is_not(None)).values(adapter_slot=None)
            )
