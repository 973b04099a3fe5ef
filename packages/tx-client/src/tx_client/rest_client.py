"""``RestClient``: training runs, checkpoints, samplers and sessions (spec §4.4).

Session-less: it loads ``client/config`` on first use but never creates a session. As in the
SDK, each method returns an :class:`APIFuture` and its ``*_async`` twin returns the value.
Checkpoint routes take the ``{kind}/{name}`` checkpoint id from a ``tinker://`` path, so they
see two path segments after ``/checkpoints/``.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

from tx_client._futures import APIFuture
from tx_client._http import Transport
from tx_client._session import SessionHolder
from tx_types import (
    CheckpointsListResponse,
    GetSamplerResponse,
    GetServerCapabilitiesResponse,
    GetSessionResponse,
    ListSessionsResponse,
    ParsedCheckpointTinkerPath,
    TrainingRun,
    TrainingRunsResponse,
    WeightsInfoResponse,
)

__all__ = ["RestClient"]

T = TypeVar("T")


def _future(coro: Coroutine[Any, Any, T]) -> APIFuture[T]:
    return APIFuture.from_coroutine(coro)


class RestClient:
    """Read and manage what a server stores: ``RestClient(base_url=None, api_key=None)``."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        holder: SessionHolder | None = None,
    ) -> None:
        self.holder = holder or SessionHolder(Transport(base_url, api_key))

    async def _get(self, path: str, model: type[Any], **params: Any) -> Any:
        await self.holder.ensure_config()
        return await self.holder.get(path, model, params=params)

    async def _send(self, method: str, path: str, json: Any = None) -> None:
        await self.holder.ensure_config()
        await self.holder.send(method, path, json=json)

    @staticmethod
    def _checkpoint_path(tinker_path: str) -> str:
        parsed = ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)
        return f"training_runs/{parsed.training_run_id}/checkpoints/{parsed.checkpoint_id}"

    # -- capabilities, runs -----------------------------------------------------------------
    async def get_server_capabilities_async(self) -> GetServerCapabilitiesResponse:
        result: GetServerCapabilitiesResponse = await self._get(
            "get_server_capabilities", GetServerCapabilitiesResponse
        )
        return result

    def get_server_capabilities(self) -> APIFuture[GetServerCapabilitiesResponse]:
        """The models this server can train and sample."""
        return _future(self.get_server_capabilities_async())

    async def get_training_run_async(
        self, training_run_id: str, access_scope: str = "owned"
    ) -> TrainingRun:
        run: TrainingRun = await self._get(
            f"training_runs/{training_run_id}", TrainingRun, access_scope=access_scope
        )
        return run

    def get_training_run(
        self, training_run_id: str, access_scope: str = "owned"
    ) -> APIFuture[TrainingRun]:
        return _future(self.get_training_run_async(training_run_id, access_scope))

    async def get_training_run_by_tinker_path_async(
        self, tinker_path: str, access_scope: str = "owned"
    ) -> TrainingRun:
        parsed = ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)
        return await self.get_training_run_async(parsed.training_run_id, access_scope)

    def get_training_run_by_tinker_path(
        self, tinker_path: str, access_scope: str = "owned"
    ) -> APIFuture[TrainingRun]:
        return _future(self.get_training_run_by_tinker_path_async(tinker_path, access_scope))

    async def list_training_runs_async(
        self,
        limit: int = 20,
        offset: int = 0,
        access_scope: str = "owned",
        project_id: str | None = None,
    ) -> TrainingRunsResponse:
        runs: TrainingRunsResponse = await self._get(
            "training_runs", TrainingRunsResponse, limit=limit, offset=offset,
            access_scope=access_scope, project_id=project_id,
        )  # fmt: skip
        return runs

    def list_training_runs(
        self,
        limit: int = 20,
        offset: int = 0,
        access_scope: str = "owned",
        project_id: str | None = None,
    ) -> APIFuture[TrainingRunsResponse]:
        """One page of training runs; ``cursor.total_count`` tells how many exist."""
        return _future(self.list_training_runs_async(limit, offset, access_scope, project_id))

    # -- checkpoints ------------------------------------------------------------------------
    async def list_checkpoints_async(self, training_run_id: str) -> CheckpointsListResponse:
        listing: CheckpointsListResponse = await self._get(
            f"training_runs/{training_run_id}/checkpoints", CheckpointsListResponse
        )
        return listing

    def list_checkpoints(self, training_run_id: str) -> APIFuture[CheckpointsListResponse]:
        return _future(self.list_checkpoints_async(training_run_id))

    async def list_user_checkpoints_async(
        self, limit: int = 100, offset: int = 0
    ) -> CheckpointsListResponse:
        listing: CheckpointsListResponse = await self._get(
            "checkpoints", CheckpointsListResponse, limit=limit, offset=offset
        )
        return listing

    def list_user_checkpoints(
        self, limit: int = 100, offset: int = 0
    ) -> APIFuture[CheckpointsListResponse]:
        """All of this user's checkpoints, newest first."""
        return _future(self.list_user_checkpoints_async(limit, offset))

    async def delete_checkpoint_async(self, training_run_id: str, checkpoint_id: str) -> None:
        await self._send("DELETE", f"training_runs/{training_run_id}/checkpoints/{checkpoint_id}")

    def delete_checkpoint(self, training_run_id: str, checkpoint_id: str) -> APIFuture[None]:
        return _future(self.delete_checkpoint_async(training_run_id, checkpoint_id))

    async def delete_checkpoint_from_tinker_path_async(self, tinker_path: str) -> None:
        await self._send("DELETE", self._checkpoint_path(tinker_path))

    def delete_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        return _future(self.delete_checkpoint_from_tinker_path_async(tinker_path))

    async def publish_checkpoint_from_tinker_path_async(self, tinker_path: str) -> None:
        await self._send("POST", f"{self._checkpoint_path(tinker_path)}/publish")

    def publish_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        return _future(self.publish_checkpoint_from_tinker_path_async(tinker_path))

    async def unpublish_checkpoint_from_tinker_path_async(self, tinker_path: str) -> None:
        await self._send("DELETE", f"{self._checkpoint_path(tinker_path)}/publish")

    def unpublish_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        return _future(self.unpublish_checkpoint_from_tinker_path_async(tinker_path))

    async def set_checkpoint_ttl_from_tinker_path_async(
        self, tinker_path: str, ttl_seconds: int | None
    ) -> None:
        path = f"{self._checkpoint_path(tinker_path)}/ttl"
        await self._send("PUT", path, json={"ttl_seconds": ttl_seconds})

    def set_checkpoint_ttl_from_tinker_path(
        self, tinker_path: str, ttl_seconds: int | None
    ) -> APIFuture[None]:
        return _future(self.set_checkpoint_ttl_from_tinker_path_async(tinker_path, ttl_seconds))

    async def get_weights_info_by_tinker_path_async(self, tinker_path: str) -> WeightsInfoResponse:
        await self.holder.ensure_config()
        return await self.holder.post(
            "weights_info", {"tinker_path": tinker_path}, WeightsInfoResponse
        )

    def get_weights_info_by_tinker_path(self, tinker_path: str) -> APIFuture[WeightsInfoResponse]:
        """Base model and LoRA configuration of a checkpoint."""
        return _future(self.get_weights_info_by_tinker_path_async(tinker_path))

    # -- samplers, sessions -----------------------------------------------------------------
    async def get_sampler_async(self, sampler_id: str) -> GetSamplerResponse:
        sampler: GetSamplerResponse = await self._get(f"samplers/{sampler_id}", GetSamplerResponse)
        return sampler

    def get_sampler(self, sampler_id: str) -> APIFuture[GetSamplerResponse]:
        return _future(self.get_sampler_async(sampler_id))

    async def get_session_async(
        self, session_id: str, access_scope: str = "owned"
    ) -> GetSessionResponse:
        session: GetSessionResponse = await self._get(
            f"sessions/{session_id}", GetSessionResponse, access_scope=access_scope
        )
        return session

    def get_session(
        self, session_id: str, access_scope: str = "owned"
    ) -> APIFuture[GetSessionResponse]:
        return _future(self.get_session_async(session_id, access_scope))

    async def list_sessions_async(
        self, limit: int = 20, offset: int = 0, access_scope: str = "owned"
    ) -> ListSessionsResponse:
        sessions: ListSessionsResponse = await self._get(
            "sessions", ListSessionsResponse, limit=limit, offset=offset, access_scope=access_scope
        )
        return sessions

    def list_sessions(
        self, limit: int = 20, offset: int = 0, access_scope: str = "owned"
    ) -> APIFuture[ListSessionsResponse]:
        return _future(self.list_sessions_async(limit, offset, access_scope))
