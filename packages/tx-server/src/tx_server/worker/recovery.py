"""Restart recovery: which training runs are live, and how to rebuild one after a restart.

A training run's state (adapter weights, AdamW moments, step count, pending gradients) lives in
an adapter slot of the worker's engine, so a worker restart loses it. Design:

* **Exact state = state after the run's last completed state-changing barrier** (``create_model``,
  ``optim_step``, ``load_weights``; the queue runs them one at a time, in order), **plus the
  gradients of the forward/backward passes completed since**.
* **Recovery snapshots** (:mod:`tx_server.worker.snapshots`): the weights *and* optimizer state
  of each changed run, cut from the engine when the worker is idle (at the latest 10 s after a
  change) and written by a background thread to
  ``{checkpoint_root}/{model_id}/recovery/{request_id}/``, named after the last barrier they
  include. ``optim_step`` never waits for them; ``load_weights`` does (it cannot be replayed).
  Snapshots are internal, never rows in ``checkpoints``, never listed.
* **Replay, not loss.** A restore starts from the newest snapshot of a *completed* barrier that
  is on disk (or from the creation) and re-runs, in order, every completed ``forward_backward``
  and ``optim_step`` after it — their payloads are still in the ``futures`` table. So a step
  whose snapshot was not yet written when the worker died is re-applied, and a resubmitted
  ``optim_step`` applies exactly the gradients the client was told about.
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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from tx_server.db.database import Database
from tx_server.db.models import FutureRow, FutureStatus, ModelRow, SessionRow
from tx_server.errors import BadRequestError, NotFoundError, ServerFaultError
from tx_server.futures import RequestType
from tx_server.worker.snapshots import snapshot_dir

__all__ = ["Recovery", "RestorePlan"]

_STATE_CHANGING = (RequestType.CREATE_MODEL, RequestType.OPTIM_STEP, RequestType.LOAD_WEIGHTS)
_REPLAYED = (RequestType.FORWARD_BACKWARD, RequestType.OPTIM_STEP)


@dataclass(frozen=True)
class RestorePlan:
    """How to rebuild a live run: load ``snapshot`` or init from ``lora``, then replay.

    ``replay`` holds ``(request_type, payload)`` of the completed ``forward_backward`` and
    ``optim_step`` requests after the starting point, in arrival order.
    """

    base_model: str
    lora: dict[str, Any]
    snapshot: Path | None
    snapshot_id: str | None
    replay: list[tuple[str, bytes]]


class Recovery:
    """Database reads and writes behind restart recovery and slot bookkeeping."""

    def __init__(self, db: Database, checkpoint_root: Path) -> None:
        self.db = db
        self.root = checkpoint_root

    def plan(self, model_id: str) -> RestorePlan:
        """The restore plan of a live run; user errors for unknown or released runs."""
        base = snapshot_dir(self.root, model_id)
        with self.db.read() as session:
            row = self._live_row(session, model_id)
            barriers = session.execute(
                select(FutureRow.id, FutureRow.request_id, FutureRow.request_type)
                .where(
                    FutureRow.model_id == model_id,
                    FutureRow.status == FutureStatus.COMPLETED,
                    FutureRow.request_type.in_(_STATE_CHANGING),
                )
                .order_by(FutureRow.id.desc())
            ).all()
            if not barriers:
                self._check_created(session, model_id)
            start, snapshot_id = self._starting_point(model_id, base, barriers)
            replay = [
                (str(kind), bytes(payload))
                for kind, payload in session.execute(
                    select(FutureRow.request_type, FutureRow.payload)
                    .where(
                        FutureRow.model_id == model_id,
                        FutureRow.status == FutureStatus.COMPLETED,
                        FutureRow.request_type.in_(_REPLAYED),
                        FutureRow.id > start,
                    )
                    .order_by(FutureRow.id)
                )
            ]
            base_model, lora = row.base_model, dict(row.lora_config)
        snapshot = None if snapshot_id is None else base / snapshot_id
        return RestorePlan(base_model, lora, snapshot, snapshot_id, replay)

    @staticmethod
    def _starting_point(model_id: str, base: Path, barriers: Any) -> tuple[int, str | None]:
        """``(queue id to replay after, snapshot to load or None)``, newest usable first.

        The newest completed barrier with a snapshot on disk, or the creation (deterministic
        from the recorded seed). A ``load_weights`` is never replayed (its source may be gone),
        so the walk stops at one without a snapshot.
        """
        for barrier in barriers:
            if (base / barrier.request_id).is_dir():
                return barrier.id, str(barrier.request_id)
            if barrier.request_type == RequestType.CREATE_MODEL:
                return barrier.id, None
            if barrier.request_type == RequestType.LOAD_WEIGHTS:
                break
        else:
            if not barriers:  # every barrier was pruned: the newest snapshot is the state
                found = sorted(
                    (p for p in base.glob("*") if not p.name.startswith(".")),
                    key=lambda p: p.stat().st_mtime_ns,
                )
                return -1, (found[-1].name if found else None)
        raise ServerFaultError(
            f"the state of model {model_id!r} was lost with the worker (no usable recovery "
            f"snapshot in {base}); create a new training client from a saved checkpoint"
        )

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
