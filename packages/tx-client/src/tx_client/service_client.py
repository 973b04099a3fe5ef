"""``ServiceClient``: the entry point; owns the session and creates the other clients.

Construction does no I/O. The first call that needs a session bootstraps it (spec §2:
``client/config`` → ``client/dynamic_config`` → ``create_session``, then a heartbeat every 10 s);
``close()`` or leaving a ``with ServiceClient() as sc:`` block POSTs
``sessions/{id}/finish``. Client-creating methods block until the client exists and have
``*_async`` twins; create-via-load derives the model id ``{session_id}:train:{model_seq_id}``
itself (spec §0 item 10), because the server's ``load_weights`` result need not carry it.
"""

from __future__ import annotations

import types as _pytypes
from collections.abc import Mapping
from typing import Any

from tx_client._errors import invalid_request
from tx_client._futures import APIFuture, ResultDecoder, poll_result
from tx_client._http import DEFAULT_MAX_RETRIES, Transport
from tx_client._loop import run_async
from tx_client._session import HEARTBEAT_INTERVAL, FinishStatus, SessionHolder
from tx_client.rest_client import RestClient
from tx_client.sampling_client import SamplingClient
from tx_client.training_client import TrainingClient
from tx_types import (
    AdamOptimizerConfig,
    CreateModelRequest,
    CreateModelResponse,
    GetInfoResponse,
    GetServerCapabilitiesResponse,
    LoadWeightsRequest,
    LoadWeightsResponse,
    LoraConfig,
    OptimizerConfig,
    UntypedAPIFuture,
)

__all__ = ["ServiceClient"]

_CREATE_MODEL = ResultDecoder[CreateModelResponse]("CreateModel", CreateModelResponse)
_LOAD_WEIGHTS = ResultDecoder[LoadWeightsResponse]("LoadWeights", LoadWeightsResponse)


class ServiceClient:
    """Connect to a tx (or Tinker-compatible) server: ``ServiceClient(base_url=..., api_key=...)``.

    ``base_url`` defaults to ``TX_BASE_URL`` / ``TINKER_BASE_URL``; ``api_key`` to ``TX_API_KEY``
    / ``TINKER_API_KEY`` (it must start with ``tml-``).
    """

    def __init__(
        self,
        user_metadata: Mapping[str, Any] | None = None,
        project_id: str | None = None,
        *,
        display_name: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        default_headers_overrides: Mapping[str, str] | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
    ) -> None:
        transport = Transport(
            base_url, api_key, max_retries=max_retries, default_headers=default_headers_overrides
        )
        self._holder = SessionHolder(
            transport,
            user_metadata=user_metadata,
            project_id=project_id,
            display_name=display_name,
            heartbeat_interval=heartbeat_interval,
        )

    @property
    def holder(self) -> SessionHolder:
        return self._holder

    @property
    def project_id(self) -> str | None:
        return self._holder.project_id

    def get_session_id(self) -> str:
        """The session id (bootstraps the session if needed)."""
        return APIFuture.from_coroutine(self._holder.ensure_session()).result()

    # -- capabilities and REST --------------------------------------------------------------
    def create_rest_client(self) -> RestClient:
        """A RestClient on this client's connection (no session needed)."""
        return RestClient(holder=self._holder)

    async def get_server_capabilities_async(self) -> GetServerCapabilitiesResponse:
        return await self.create_rest_client().get_server_capabilities_async()

    def get_server_capabilities(self) -> GetServerCapabilitiesResponse:
        """The models this server can train and sample."""
        return self.create_rest_client().get_server_capabilities().result()

    # -- training clients -------------------------------------------------------------------
    async def _training_client(self, model_id: str) -> TrainingClient:
        info = await self._holder.post(
            "get_info", {"model_id": model_id, "type": "get_info"}, GetInfoResponse
        )
        return TrainingClient(self._holder, model_id, info)

    async def _create_lora(
        self, base_model: str, lora: LoraConfig, user_metadata: Mapping[str, Any] | None,
        optimizer: OptimizerConfig | None,
    ) -> TrainingClient:  # fmt: skip
        session_id = await self._holder.ensure_session()
        with invalid_request("create_model"):
            request = CreateModelRequest(
                session_id=session_id,
                model_seq_id=self._holder.next_model_seq_id(),
                base_model=base_model,
                user_metadata=dict(user_metadata) if user_metadata is not None else None,
                lora_config=lora,
                optimizer_config=optimizer or AdamOptimizerConfig(),
            )
        future = await self._holder.post("create_model", request, UntypedAPIFuture)
        created = await poll_result(self._holder.transport, future.request_id, _CREATE_MODEL)
        return await self._training_client(created.model_id)

    @staticmethod
    def _lora(
        rank: int, seed: int | None, train_mlp: bool, train_attn: bool, train_unembed: bool
    ) -> LoraConfig:
        if not (train_mlp or train_attn or train_unembed):
            raise ValueError("at least one of train_mlp, train_attn, train_unembed must be True")
        with invalid_request("create_model"):
            return LoraConfig(
                rank=rank, seed=seed, train_mlp=train_mlp, train_attn=train_attn,
                train_unembed=train_unembed,
            )  # fmt: skip

    def create_lora_training_client(
        self, base_model: str, rank: int = 32, seed: int | None = None, train_mlp: bool = True,
        train_attn: bool = True, train_unembed: bool = True,
        user_metadata: Mapping[str, Any] | None = None, optimizer: OptimizerConfig | None = None,
    ) -> TrainingClient:  # fmt: skip
        """A new LoRA adapter on ``base_model``, ready to train."""
        lora = self._lora(rank, seed, train_mlp, train_attn, train_unembed)
        coro = self._create_lora(base_model, lora, user_metadata, optimizer)
        return APIFuture.from_coroutine(coro).result()

    async def create_lora_training_client_async(
        self, base_model: str, rank: int = 32, seed: int | None = None, train_mlp: bool = True,
        train_attn: bool = True, train_unembed: bool = True,
        user_metadata: Mapping[str, Any] | None = None, optimizer: OptimizerConfig | None = None,
    ) -> TrainingClient:  # fmt: skip
        lora = self._lora(rank, seed, train_mlp, train_attn, train_unembed)
        return await run_async(self._create_lora(base_model, lora, user_metadata, optimizer))

    async def _from_state(
        self, path: str, with_optimizer: bool, base_model: str | None,
        user_metadata: Mapping[str, Any] | None, weights_access_token: str | None,
        optimizer: OptimizerConfig | None,
    ) -> TrainingClient:  # fmt: skip
        session_id = await self._holder.ensure_session()
        model_seq_id = self._holder.next_model_seq_id()
        with invalid_request("load_weights"):
            request = LoadWeightsRequest(
                session_id=session_id,
                model_seq_id=model_seq_id,
                path=path,
                optimizer=with_optimizer,
                base_model=base_model,
                user_metadata=dict(user_metadata) if user_metadata is not None else None,
                optimizer_config=optimizer,
                weights_access_token=weights_access_token,
            )
        future = await self._holder.post("load_weights", request, UntypedAPIFuture)
        await poll_result(self._holder.transport, future.request_id, _LOAD_WEIGHTS)
        return await self._training_client(f"{session_id}:train:{model_seq_id}")

    def create_training_client_from_state(
        self, path: str, base_model: str | None = None,
        user_metadata: Mapping[str, Any] | None = None, weights_access_token: str | None = None,
        optimizer: OptimizerConfig | None = None,
    ) -> TrainingClient:  # fmt: skip
        """A new model with the weights of checkpoint ``path`` (fresh optimizer state)."""
        coro = self._from_state(
            path, False, base_model, user_metadata, weights_access_token, optimizer
        )
        return APIFuture.from_coroutine(coro).result()

    async def create_training_client_from_state_async(
        self, path: str, base_model: str | None = None,
        user_metadata: Mapping[str, Any] | None = None, weights_access_token: str | None = None,
        optimizer: OptimizerConfig | None = None,
    ) -> TrainingClient:  # fmt: skip
        return await run_async(
            self._from_state(
                path, False, base_model, user_metadata, weights_access_token, optimizer
            )
        )

    def create_training_client_from_state_with_optimizer(
        self, path: str, base_model: str | None = None,
        user_metadata: Mapping[str, Any] | None = None, weights_access_token: str | None = None,
    ) -> TrainingClient:  # fmt: skip
        """A new model with the weights *and* optimizer state of checkpoint ``path``."""
        coro = self._from_state(path, True, base_model, user_metadata, weights_access_token, None)
        return APIFuture.from_coroutine(coro).result()

    async def create_training_client_from_state_with_optimizer_async(
        self, path: str, base_model: str | None = None,
        user_metadata: Mapping[str, Any] | None = None, weights_access_token: str | None = None,
    ) -> TrainingClient:  # fmt: skip
        return await run_async(
            self._from_state(path, True, base_model, user_metadata, weights_access_token, None)
        )

    # -- sampling ---------------------------------------------------------------------------
    def create_sampling_client(
        self, model_path: str | None = None, base_model: str | None = None,
        retry_config: Any = None, record_stability_info: bool = False,
    ) -> SamplingClient:  # fmt: skip
        """Sample from saved sampler weights (``tinker://…``) or from a base model."""
        coro = SamplingClient.from_path(self._holder, model_path, base_model, record_stability_info)
        return APIFuture.from_coroutine(coro).result()

    async def create_sampling_client_async(
        self, model_path: str | None = None, base_model: str | None = None,
        retry_config: Any = None, record_stability_info: bool = False,
    ) -> SamplingClient:  # fmt: skip
        return await run_async(
            SamplingClient.from_path(self._holder, model_path, base_model, record_stability_info)
        )

    # -- lifecycle --------------------------------------------------------------------------
    def close(self, status: FinishStatus = "success", detail: str | None = None) -> APIFuture[None]:
        """Finish the session (first reason wins), stop heartbeats, release connections."""
        return APIFuture.from_coroutine(self._holder.finish(status, detail))

    def __enter__(self) -> ServiceClient:
        if self._holder.transport.closed:
            raise RuntimeError("ServiceClient is closed")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: _pytypes.TracebackType | None,
    ) -> None:
        # As the SDK: an Exception is "errored"; any other BaseException (Ctrl-C, sys.exit(),
        # a cancelled task) is "interrupted".
        status: FinishStatus = "success"
        if exc_type is not None:
            status = "errored" if issubclass(exc_type, Exception) else "interrupted"
        self.close(status, None if exc is None else repr(exc)).result()
