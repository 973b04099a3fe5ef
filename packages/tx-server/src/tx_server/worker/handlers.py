"""Barrier requests: create_model, save/load weights, save for sampler, unload.

(``optim_step``, also a barrier, is fused across tenants: :mod:`.optim_steps`.)

Each handler takes the claimed request and returns the JSON result bytes; raising fails the
request (the caller maps the exception to a wire category). Database rows that record files
(``checkpoints``, ``sampling_sessions``) are written only after the files are complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from tx_engine.engine import TrainingEngine
from tx_server.db.database import Database
from tx_server.db.models import CheckpointRow, ModelRow, SamplingSessionRow, utcnow
from tx_server.errors import BadRequestError
from tx_server.futures import RequestType
from tx_server.work_queue import ClaimedRequest
from tx_server.worker.engines import EngineHost, create_from_config
from tx_server.worker.storage import checkpoint_dir, dir_size, ephemeral_name, find_checkpoint
from tx_server.worker.stored import load_stored
from tx_types import (
    CreateModelRequest,
    CreateModelResponse,
    LoadWeightsResponse,
    SaveWeightsForSamplerResponseInternal,
    SaveWeightsResponse,
    UnloadModelResponse,
)
from tx_types.paths import make_tinker_path

__all__ = ["BarrierHandlers", "export_for_sampler"]


def export_for_sampler(engine: TrainingEngine, slot: int, target: Path, peft: bool = True) -> None:
    """Write ``slot`` as the engine's own weights-only adapter checkpoint, and as PEFT.

    tx's own sampler loads the engine format (``adapter.safetensors`` + ``metadata.json``, no
    name clash with PEFT's files) into a free slot, because the engine has a loader for that
    format only. The PEFT files are for external samplers, so only a named checkpoint (listed,
    downloadable) gets them: an unnamed (ephemeral) save is read by tx's sampler alone, and is
    made once per RL iteration, where PEFT's copy was 51 of the ~100 ms of writing on the small
    preset. Being files on disk, an ephemeral save is a frozen snapshot: training continuing
    on the model does not change what a sampler created from it returns.
    """
    if peft:
        engine.export_peft(slot, target)
    engine.save_adapter(slot, target, include_optimizer=False)


class BarrierHandlers:
    """Runs the non-batched request types against the worker's engines."""

    def __init__(self, host: EngineHost, db: Database, checkpoint_root: Path) -> None:
        self.host = host
        self.db = db
        self.root = checkpoint_root

    def table(self) -> dict[str, Callable[[ClaimedRequest], bytes]]:
        """Handler per request type."""
        return {
            RequestType.CREATE_MODEL: self.create_model,
            RequestType.SAVE_WEIGHTS: self.save_weights,
            RequestType.SAVE_WEIGHTS_FOR_SAMPLER: self.save_for_sampler,
            RequestType.LOAD_WEIGHTS: self.load_weights,
            RequestType.UNLOAD_MODEL: self.unload_model,
        }

    def create_model(self, req: ClaimedRequest) -> bytes:
        body = CreateModelRequest.model_validate_json(req.payload)
        assert req.model_id is not None
        if self.host.find(req.model_id) is None:
            lora = body.lora_config.model_dump(mode="json") if body.lora_config else {"rank": 32}
            if lora.get("seed") is None:  # drawn here and recorded, so a restore repeats it
                lora["seed"] = int.from_bytes(os.urandom(4), "little")
            slot = self.host.allocate(body.base_model, lambda e: create_from_config(e, lora))
            self.host.add(req.model_id, body.base_model, slot, lora)
        return CreateModelResponse(model_id=req.model_id).model_dump_json().encode()

    def save_weights(self, req: ClaimedRequest) -> bytes:
        data = json.loads(req.payload)
        model_id, name = data["request"]["model_id"], data["name"]
        loaded = self.host.get(model_id)
        target = checkpoint_dir(self.root, model_id, "training", name)
        tinker_path = make_tinker_path(model_id, "training", name)
        self._check_free(tinker_path, overwrite=bool(data["request"].get("overwrite")))
        loaded.engine.save_adapter(loaded.slot, target, include_optimizer=True)
        self._register(req, model_id, "training", name, target, data["request"])
        return SaveWeightsResponse(path=tinker_path, type="save_weights").model_dump_json().encode()

    def save_for_sampler(self, req: ClaimedRequest) -> bytes:
        data = json.loads(req.payload)
        body: dict[str, Any] = data["request"]
        model_id = body["model_id"]
        loaded = self.host.get(model_id)
        if body.get("path") is not None:
            name = body["path"]
            target = checkpoint_dir(self.root, model_id, "sampler", name)
            tinker_path = make_tinker_path(model_id, "sampler", name)
            self._check_free(tinker_path, overwrite=True)
            export_for_sampler(loaded.engine, loaded.slot, target)
            self._register(req, model_id, "sampler", name, target, body)
            result = SaveWeightsForSamplerResponseInternal(
                path=tinker_path, type="save_weights_for_sampler"
            )
        else:
            seq = int(body["sampling_session_seq_id"])
            name = ephemeral_name(seq)
            target = checkpoint_dir(self.root, model_id, "sampler", name)
            export_for_sampler(loaded.engine, loaded.slot, target, peft=False)
            session_id = data["session_id"]
            sampler_id = f"{session_id}:sample:{seq}"
            self._add_sampler(req, sampler_id, session_id, seq, data["base_model"], model_id, name)
            result = SaveWeightsForSamplerResponseInternal(
                sampling_session_id=sampler_id, type="save_weights_for_sampler"
            )
        return result.model_dump_json(exclude_none=True).encode()

    def load_weights(self, req: ClaimedRequest) -> bytes:
        data = json.loads(req.payload)
        model_id, storage = data["target_model_id"], data["storage_path"]
        with_optimizer = bool(data["request"]["optimizer"])
        loaded = self.host.find(model_id)
        if loaded is not None:
            load_stored(loaded.engine, storage, slot=loaded.slot, with_optimizer=with_optimizer)
        else:  # a new run (create-via-load), or one this worker does not hold: no restore needed
            base_model = self.host.recovery.require_live(model_id)
            slot = self.host.allocate(
                base_model,
                lambda e: load_stored(e, storage, slot=None, with_optimizer=with_optimizer),
            )
            self.host.add(model_id, base_model, slot)
        self.host.snapshot(model_id, req.request_id, wait=True)  # a load is never replayed
        response = LoadWeightsResponse(
            path=data["request"]["path"], model_id=model_id, type="load_weights"
        )
        return response.model_dump_json(exclude_none=True).encode()

    def unload_model(self, req: ClaimedRequest) -> bytes:
        """Free the run's slot for good; its completed request is the durable unload record."""
        assert req.model_id is not None
        self.host.release(req.model_id)
        self.host.snapshots.drop(req.model_id)
        response = UnloadModelResponse(model_id=req.model_id, type="unload_model")
        return response.model_dump_json().encode()

    # ------------------------------------------------------------------ rows
    def _check_free(self, tinker_path: str, overwrite: bool) -> None:
        with self.db.read() as session:
            taken = find_checkpoint(session, tinker_path) is not None
        if taken and not overwrite:
            raise BadRequestError(
                f"checkpoint {tinker_path!r} already exists; pass overwrite=True to replace it"
            )

    def _register(
        self,
        req: ClaimedRequest,
        model_id: str,
        kind: str,
        name: str,
        target: Path,
        body: dict[str, Any],
    ) -> None:
        tinker_path = make_tinker_path(model_id, kind, name)  # type: ignore[arg-type]
        with self.db.write() as session:
            row = find_checkpoint(session, tinker_path)
            if row is None:
                row = CheckpointRow(model_id=model_id, tenant_id=req.tenant_id, name=name)
                session.add(row)
            row.checkpoint_type = kind
            row.tinker_path = tinker_path
            row.storage_path = str(target)
            row.size_bytes = dir_size(target)
            row.user_metadata = dict(body.get("user_metadata") or {})
            row.created_at = utcnow()
            # The save's ttl_seconds (range-checked by the route); an overwrite without one
            # clears an earlier expiry, since the files are new.
            ttl = body.get("ttl_seconds")
            row.expires_at = row.created_at + timedelta(seconds=ttl) if ttl else None
            model = session.get(ModelRow, model_id)
            if model is not None:
                model.last_request_at = utcnow()

    def _add_sampler(
        self,
        req: ClaimedRequest,
        sampler_id: str,
        session_id: str,
        seq: int,
        base_model: str,
        model_id: str,
        name: str,
    ) -> None:
        with self.db.write() as session:
            exists = session.scalar(
                select(SamplingSessionRow.id).where(SamplingSessionRow.id == sampler_id)
            )
            if exists is None:
                session.add(
                    SamplingSessionRow(
                        id=sampler_id,
                        session_id=session_id,
                        sampling_session_seq_id=seq,
                        tenant_id=req.tenant_id,
                        base_model=base_model,
                        model_path=make_tinker_path(model_id, "sampler", name),
                        source_model_id=model_id,
                    )
                )
