"""Checkpoint requests: ``save_weights``, ``load_weights`` (both modes),
``save_weights_for_sampler`` and ``weights_info`` (spec §4.1, §4.2, §4.4).

Routes only validate and queue; the worker writes the files and the ``checkpoints`` rows, in
the model's request order. The JSON payload the worker reads is the request itself plus what
the route resolved (``storage_path`` of the checkpoint to load).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from tx_server.api.access import readable_checkpoint
from tx_server.api.deps import StateDep, TenantDep
from tx_server.api.routes.models import (
    created_before,
    get_owned_model,
    model_id_for,
    submit,
    submit_for_model,
)
from tx_server.api.state import AppState
from tx_server.db.models import CheckpointRow, ModelRow
from tx_server.errors import BadRequestError, NotFoundError
from tx_server.futures import RequestType, Submission
from tx_server.settings import same_base_model
from tx_server.worker.storage import EPHEMERAL_PREFIX, checkpoint_dir
from tx_types import (
    LoadWeightsRequest,
    SaveWeightsForSamplerRequest,
    SaveWeightsRequest,
    UntypedAPIFuture,
    WeightsInfoRequest,
    WeightsInfoResponse,
)

router = APIRouter(tags=["weights"])


_MAX_TTL_SECONDS = 10 * 365 * 24 * 3600  # the SDK documents "1 hour to 10 years"


def check_ttl(state: AppState, ttl_seconds: int | None) -> None:
    """BadRequestError naming ``ttl_seconds`` when it is outside the accepted range."""
    low = state.settings.checkpoint_min_ttl_seconds
    if ttl_seconds is not None and not low <= ttl_seconds <= _MAX_TTL_SECONDS:
        raise BadRequestError(
            f"ttl_seconds must be between {low} and {_MAX_TTL_SECONDS} (10 years), "
            f"got {ttl_seconds}"
        )


def _payload(body: Any, **extra: Any) -> bytes:
    return json.dumps({"request": body.model_dump(mode="json"), **extra}).encode()


@router.post("/save_weights", response_model=UntypedAPIFuture)
async def save_weights(
    body: SaveWeightsRequest, tenant: TenantDep, state: StateDep
) -> UntypedAPIFuture:
    """Queue a save of weights and optimizer state as ``tinker://{model}/weights/{name}``.

    ``ttl_seconds`` travels in the payload; the checkpoint row takes its ``expires_at`` from
    it when the worker registers the files (see :mod:`tx_server.db.models`).
    """
    check_ttl(state, body.ttl_seconds)
    name = body.path or f"step-{body.seq_id or 0}"
    checkpoint_dir(state.settings.checkpoint_root, body.model_id, "training", name)
    submission = Submission(
        RequestType.SAVE_WEIGHTS,
        _payload(body, name=name),
        model_id=body.model_id,
        seq_id=body.seq_id,
    )
    return await submit_for_model(state, tenant, submission, body.model_id)


@router.post("/save_weights_for_sampler", response_model=UntypedAPIFuture)
async def save_weights_for_sampler(
    body: SaveWeightsForSamplerRequest, tenant: TenantDep, state: StateDep
) -> UntypedAPIFuture:
    """Named: a PEFT export under ``sampler_weights/{name}``; unnamed: a sampling session."""
    check_ttl(state, body.ttl_seconds)
    model = await run_in_threadpool(get_owned_model, state, tenant, body.model_id)
    extra: dict[str, Any] = {"base_model": model.base_model, "session_id": model.session_id}
    if body.path is not None:
        checkpoint_dir(state.settings.checkpoint_root, body.model_id, "sampler", body.path)
        if body.path.startswith(EPHEMERAL_PREFIX):
            raise BadRequestError(
                f"path {body.path!r}: names starting with {EPHEMERAL_PREFIX!r} are reserved "
                "for the unnamed snapshots of save_weights_and_get_sampling_client"
            )
    elif body.sampling_session_seq_id is None:
        raise BadRequestError("save_weights_for_sampler needs path or sampling_session_seq_id")
    submission = Submission(
        RequestType.SAVE_WEIGHTS_FOR_SAMPLER,
        _payload(body, **extra),
        model_id=body.model_id,
        seq_id=body.seq_id,
    )
    return await submit_for_model(state, tenant, submission, body.model_id)


def _readable_checkpoint(
    state: AppState, tenant: str, tinker_path: str
) -> tuple[CheckpointRow, ModelRow]:
    """The checkpoint at ``tinker_path`` and its run, if the caller may read it (else 404)."""
    with state.db.read() as session:
        row = readable_checkpoint(session, tenant, tinker_path)
        model = session.get(ModelRow, row.model_id)
        if model is None:
            raise NotFoundError(f"the training run of {tinker_path!r} no longer exists")
        return row, model


def _register_loaded_model(
    state: AppState,
    tenant: str,
    body: LoadWeightsRequest,
    source: ModelRow,
    key: tuple[str, int],
) -> None:
    """Create-via-load: the new run inherits base model and LoRA config from the checkpoint."""
    model_id = model_id_for(*key)
    if body.base_model is not None and not same_base_model(body.base_model, source.base_model):
        raise BadRequestError(
            f"base_model {body.base_model!r} does not match the checkpoint's {source.base_model!r}"
        )
    session_id, model_seq_id = key
    state.sessions.get_active(tenant, session_id)
    with state.db.write() as session:
        if session.get(ModelRow, model_id) is not None:
            return  # a transport retry
        if created_before(session, session_id, model_seq_id):
            return  # ... of one that failed (its run was removed): the failure stands
        session.add(
            ModelRow(
                id=model_id,
                session_id=session_id,
                model_seq_id=model_seq_id,
                tenant_id=tenant,
                base_model=source.base_model,
                lora_config=dict(source.lora_config),
                optimizer_config=dict(source.optimizer_config),
                user_metadata={k: str(v) for k, v in (body.user_metadata or {}).items()},
            )
        )


def _lora_shape(lora: dict[str, Any]) -> dict[str, Any]:
    """What an adapter's tensors are shaped by (``weights_info``'s defaults for absent keys)."""
    return {
        "rank": int(lora.get("rank", 32)),
        "train_attn": bool(lora.get("train_attn", True)),
        "train_mlp": bool(lora.get("train_mlp", True)),
        "train_unembed": bool(lora.get("train_unembed", True)),
    }


def _check_loadable_into(target: ModelRow, source: ModelRow, path: str) -> None:
    """BadRequestError unless the checkpoint (of run ``source``) fits the run ``target``.

    Loading replaces the adapter's weights in place: a checkpoint of another base model, rank
    or set of trained layers would silently change what the run is (and what its later saves
    and ``get_training_run`` report). Create a new run from the checkpoint instead.
    """
    if target.base_model != source.base_model:
        raise BadRequestError(
            f"{path!r} is a checkpoint of base model {source.base_model!r}; "
            f"model {target.id!r} is of {target.base_model!r}"
        )
    have, want = _lora_shape(target.lora_config), _lora_shape(source.lora_config)
    if have != want:
        differ = ", ".join(
            f"{k} {want[k]} (the run has {have[k]})" for k in have if have[k] != want[k]
        )
        raise BadRequestError(
            f"{path!r} does not fit model {target.id!r}: its LoRA config has {differ}; "
            "load it into a new training client (create_training_client_from_state) instead"
        )


def _prepare_load(state: AppState, tenant: str, body: LoadWeightsRequest) -> tuple[str, str]:
    """The target model id and the checkpoint's storage path (creating the model if asked)."""
    checkpoint, source = _readable_checkpoint(state, tenant, body.path)
    if checkpoint.checkpoint_type != "training":
        raise BadRequestError(f"{body.path!r} is not a training-state (weights/) checkpoint")
    if body.model_id is not None:
        _check_loadable_into(get_owned_model(state, tenant, body.model_id), source, body.path)
        return body.model_id, checkpoint.storage_path
    if body.session_id is None or body.model_seq_id is None:
        raise BadRequestError("load_weights needs model_id, or session_id and model_seq_id")
    key = (body.session_id, body.model_seq_id)
    model_id = model_id_for(*key)
    _register_loaded_model(state, tenant, body, source, key)
    return model_id, checkpoint.storage_path


@router.post("/load_weights", response_model=UntypedAPIFuture)
async def load_weights(
    body: LoadWeightsRequest, tenant: TenantDep, state: StateDep
) -> UntypedAPIFuture:
    """Queue a load into an existing model, or create ``{session}:train:{n}`` from a checkpoint."""
    model_id, storage = await run_in_threadpool(_prepare_load, state, tenant, body)
    creating = body.model_id is None
    submission = Submission(
        RequestType.LOAD_WEIGHTS,
        _payload(body, storage_path=storage, target_model_id=model_id),
        model_id=model_id,
        seq_id=body.seq_id,
        session_id=body.session_id if creating else None,
        model_seq_id=body.model_seq_id if creating else None,
    )
    if creating:  # _prepare_load checked that the session is active
        return await submit(state, tenant, submission, model_id)
    return await submit_for_model(state, tenant, submission, model_id)


@router.post("/weights_info", response_model=WeightsInfoResponse, response_model_exclude_none=True)
async def weights_info(
    body: WeightsInfoRequest, tenant: TenantDep, state: StateDep
) -> WeightsInfoResponse:
    """Base model and LoRA shape of a checkpoint the caller can read."""
    _checkpoint, model = await run_in_threadpool(
        _readable_checkpoint, state, tenant, body.tinker_path
    )
    lora = model.lora_config
    return WeightsInfoResponse(
        base_model=model.base_model,
        is_lora=True,
        lora_rank=int(lora.get("rank", 32)),
        train_unembed=bool(lora.get("train_unembed", True)),
        train_mlp=bool(lora.get("train_mlp", True)),
        train_attn=bool(lora.get("train_attn", True)),
    )
