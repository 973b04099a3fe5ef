"""``TrainingClient``: one LoRA model's operations (spec §4.2), mirroring ``tinker``.

Every work method reserves its request ids when called and POSTs in turn (see
:mod:`tx_client._ordering`), so calls pipeline and reach the server in call order.
Forward/backward batches are chunked by the server's ``client/config`` limits
(:mod:`tx_client._chunking`), one ``seq_id`` per chunk, and merged on return
(:mod:`tx_client._metrics`). ``forward_backward_custom`` runs a client-side loss in two passes
(:mod:`tx_client._custom_loss`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from tx_client import _custom_loss
from tx_client._backcompat import ResolvedClientFuture
from tx_client._chunking import chunk_data
from tx_client._futures import APIFuture, ResultDecoder, poll_result
from tx_client._fwdbwd import collect_chunks, submit_chunks
from tx_client._loop import run_async
from tx_client._ordering import RequestSequencer, TwoPhase, run_two_phase, run_two_phase_async
from tx_client._session import SessionHolder
from tx_client._tokenizer import load_tokenizer, tokenizer_id_for
from tx_types import (
    AdamParams,
    Datum,
    DimuonParams,
    ForwardBackwardOutput,
    GetInfoResponse,
    LoadWeightsResponse,
    OptimParams,
    OptimStepResponse,
    SaveWeightsForSamplerResponse,
    SaveWeightsForSamplerResponseInternal,
    SaveWeightsResponse,
    UntypedAPIFuture,
)

if TYPE_CHECKING:
    from tx_client.sampling_client import SamplingClient

__all__ = ["TrainingClient"]

T = TypeVar("T")
LossConfig = Mapping[str, float | str] | None
_OPTIM = ResultDecoder[OptimStepResponse]("OptimStep", OptimStepResponse)
_SAVE = ResultDecoder[SaveWeightsResponse]("SaveWeights", SaveWeightsResponse)
_LOAD = ResultDecoder[LoadWeightsResponse]("LoadWeights", LoadWeightsResponse)
_SAVE_SAMPLER = ResultDecoder[SaveWeightsForSamplerResponseInternal](
    "SaveWeightsForSampler", SaveWeightsForSamplerResponseInternal
)


class TrainingClient(ResolvedClientFuture):
    """Train one model. Create it with ``ServiceClient.create_lora_training_client``."""

    def __init__(self, holder: SessionHolder, model_id: str, info: GetInfoResponse) -> None:
        self.holder = holder
        self.model_id = model_id
        self._info = info
        self._sequencer = RequestSequencer()

    # -- forward / backward ----------------------------------------------------------------
    def _plan(self, data: list[Datum], passes: int = 1) -> tuple[int, list[list[Datum]]]:
        if not data:
            raise ValueError("data must contain at least one Datum")
        config = self.holder.config
        assert config is not None, "the config is loaded before a model exists"
        chunks = chunk_data(
            list(data), config.fwdbwd_max_chunk_len, config.fwdbwd_max_chunk_bytes_count
        )
        return self._sequencer.reserve(passes * len(chunks)), chunks

    def _fwd_bwd(
        self, data: list[Datum], loss_fn: str, config: LossConfig, forward_only: bool
    ) -> TwoPhase[list[str], ForwardBackwardOutput]:
        start, chunks = self._plan(data)
        submission = submit_chunks(
            self.holder, self._sequencer, self.model_id, start, chunks, loss_fn, config,
            forward_only,
        )  # fmt: skip
        return submission, lambda ids: collect_chunks(self.holder, ids)

    def forward(
        self, data: list[Datum], loss_fn: str, loss_fn_config: LossConfig = None
    ) -> APIFuture[ForwardBackwardOutput]:
        """Outputs and loss without gradients (``forward_only`` forward/backward)."""
        return run_two_phase(*self._fwd_bwd(data, loss_fn, loss_fn_config, True))

    async def forward_async(
        self, data: list[Datum], loss_fn: str, loss_fn_config: LossConfig = None
    ) -> APIFuture[ForwardBackwardOutput]:
        return await run_two_phase_async(*self._fwd_bwd(data, loss_fn, loss_fn_config, True))

    def forward_backward(
        self, data: list[Datum], loss_fn: str, loss_fn_config: LossConfig = None
    ) -> APIFuture[ForwardBackwardOutput]:
        """Forward pass and gradient accumulation; apply them with :meth:`optim_step`."""
        return run_two_phase(*self._fwd_bwd(data, loss_fn, loss_fn_config, False))

    async def forward_backward_async(
        self, data: list[Datum], loss_fn: str, loss_fn_config: LossConfig = None
    ) -> APIFuture[ForwardBackwardOutput]:
        return await run_two_phase_async(*self._fwd_bwd(data, loss_fn, loss_fn_config, False))

    # -- custom loss (two passes; see tx_client._custom_loss) --------------------------------
    async def _custom(
        self, data: list[Datum], fn: Callable[..., Any], backend: str, start: int,
        chunks: list[list[Datum]],
    ) -> ForwardBackwardOutput:  # fmt: skip
        n = len(chunks)
        try:
            ids = await submit_chunks(
                self.holder, self._sequencer, self.model_id, start, chunks, "cross_entropy",
                None, True,
            )  # fmt: skip
            forward = await collect_chunks(self.holder, ids)
            result = _custom_loss.compute_custom_loss(data, fn, forward, backend)  # type: ignore[arg-type]
        except BaseException:
            await self._sequencer.skip(start + n, start + 2 * n)  # later calls must not wait
            raise
        back, offset = [], 0
        for chunk in chunks:  # same boundaries: the reserved seq_ids must all be used
            back.append(result.backward_data[offset : offset + len(chunk)])
            offset += len(chunk)
        ids = await submit_chunks(
            self.holder, self._sequencer, self.model_id, start + n, back, "cross_entropy",
            None, False,
        )  # fmt: skip
        output = await collect_chunks(self.holder, ids)
        metrics = dict(output.metrics)
        surrogate = metrics.pop("loss:sum")
        metrics.update(result.metrics)
        metrics["loss:sum"] = result.loss_sum
        metrics["surrogate_loss:sum"] = surrogate
        return output.model_copy(update={"metrics": metrics})

    def forward_backward_custom(
        self, data: list[Datum], loss_fn: Callable[..., Any], *,
        loss_type_input: Literal["logprobs"] | None = None, backend: str | None = None,
    ) -> APIFuture[ForwardBackwardOutput]:  # fmt: skip
        """Backward pass of any differentiable ``loss_fn(data, logprobs) -> (loss, metrics)``.

        ``backend`` picks how its gradient is taken: ``"torch"`` (default when installed),
        ``"jax"``, or ``"numpy"`` (then the function returns ``(loss, metrics, grads)``).
        ``loss_type_input`` is the SDK's deprecated no-op, accepted so that calls passing it
        keep working.
        """
        _check_loss_type_input(loss_type_input)
        start, chunks = self._plan(_custom_loss.forward_data(data), passes=2)
        chosen = backend or _custom_loss.default_backend()
        return APIFuture.from_coroutine(self._custom(list(data), loss_fn, chosen, start, chunks))

    async def forward_backward_custom_async(
        self, data: list[Datum], loss_fn: Callable[..., Any], *,
        loss_type_input: Literal["logprobs"] | None = None, backend: str | None = None,
    ) -> APIFuture[ForwardBackwardOutput]:  # fmt: skip
        return self.forward_backward_custom(
            data, loss_fn, loss_type_input=loss_type_input, backend=backend
        )

    # -- JSON operations --------------------------------------------------------------------
    def _json_op(
        self, path: str, body: dict[str, Any], decoder: ResultDecoder[T], **kw: Any
    ) -> TwoPhase[str, T]:
        start = self._sequencer.reserve(1)
        full = {"model_id": self.model_id, "seq_id": start + 1, **body}

        async def post() -> str:
            return (await self.holder.post(path, full, UntypedAPIFuture, **kw)).request_id

        async def collect(request_id: str) -> T:
            return await poll_result(self.holder.transport, request_id, decoder)

        return self._sequencer.in_turn(start, start + 1, post), collect

    def _optim(self, params: OptimParams | None, adam: AdamParams | None) -> TwoPhase[str, Any]:
        chosen = adam if adam is not None else params
        if chosen is None:
            raise ValueError("optim_step needs adam_params (or optim_params)")
        if not isinstance(chosen, (AdamParams, DimuonParams)):  # e.g. a dict: as in the SDK
            raise TypeError("Expected AdamParams or OptimParamsBase")
        key = "adam_params" if isinstance(chosen, AdamParams) else "optimizer_params"
        body = {key: chosen.model_dump(mode="json", exclude_none=True), "type": "optim_step"}
        return self._json_op("optim_step", body, _OPTIM)

    def optim_step(
        self, optim_params: OptimParams | None = None, *, adam_params: AdamParams | None = None
    ) -> APIFuture[OptimStepResponse]:
        """Apply the accumulated gradients."""
        return run_two_phase(*self._optim(optim_params, adam_params))

    async def optim_step_async(
        self, optim_params: OptimParams | None = None, *, adam_params: AdamParams | None = None
    ) -> APIFuture[OptimStepResponse]:
        return await run_two_phase_async(*self._optim(optim_params, adam_params))

    def _save(
        self, name: str, ttl: int | None, overwrite: bool, meta: dict[str, str] | None
    ) -> TwoPhase[str, SaveWeightsResponse]:
        body = {"path": name, "ttl_seconds": ttl, "overwrite": overwrite, "user_metadata": meta,
                "type": "save_weights"}  # fmt: skip
        return self._json_op("save_weights", _drop_none(body), _SAVE)

    def save_state(
        self, name: str, ttl_seconds: int | None = None, overwrite: bool = False,
        user_metadata: dict[str, str] | None = None,
    ) -> APIFuture[SaveWeightsResponse]:  # fmt: skip
        """Save weights *and* optimizer state as ``tinker://{model_id}/weights/{name}``."""
        return run_two_phase(*self._save(name, ttl_seconds, overwrite, user_metadata))

    async def save_state_async(
        self, name: str, ttl_seconds: int | None = None, overwrite: bool = False,
        user_metadata: dict[str, str] | None = None,
    ) -> APIFuture[SaveWeightsResponse]:  # fmt: skip
        return await run_two_phase_async(*self._save(name, ttl_seconds, overwrite, user_metadata))

    def _load(self, path: str, optimizer: bool, token: str | None) -> TwoPhase[str, Any]:
        body = {"path": path, "optimizer": optimizer, "weights_access_token": token,
                "type": "load_weights"}  # fmt: skip
        return self._json_op("load_weights", _drop_none(body), _LOAD)

    def load_state(
        self, path: str, weights_access_token: str | None = None
    ) -> APIFuture[LoadWeightsResponse]:
        """Load weights only (optimizer state reset) from a ``tinker://…/weights/…`` path."""
        return run_two_phase(*self._load(path, False, weights_access_token))

    async def load_state_async(
        self, path: str, weights_access_token: str | None = None
    ) -> APIFuture[LoadWeightsResponse]:
        return await run_two_phase_async(*self._load(path, False, weights_access_token))

    def load_state_with_optimizer(
        self, path: str, weights_access_token: str | None = None
    ) -> APIFuture[LoadWeightsResponse]:
        """Load weights and optimizer state."""
        return run_two_phase(*self._load(path, True, weights_access_token))

    async def load_state_with_optimizer_async(
        self, path: str, weights_access_token: str | None = None
    ) -> APIFuture[LoadWeightsResponse]:
        return await run_two_phase_async(*self._load(path, True, weights_access_token))

    # -- sampler weights --------------------------------------------------------------------
    def _sampler_save(
        self, name: str | None, ttl: int | None, meta: dict[str, str] | None, kind: str
    ) -> TwoPhase[str, SaveWeightsForSamplerResponseInternal]:
        body: dict[str, Any] = {"kind": kind, "type": "save_weights_for_sampler"}
        if name is None:  # unnamed: the server also opens a sampling session on the snapshot
            body["sampling_session_seq_id"] = self.holder.next_sampling_session_seq_id()
        else:
            body.update(_drop_none({"path": name, "ttl_seconds": ttl, "user_metadata": meta}))
        return self._json_op("save_weights_for_sampler", body, _SAVE_SAMPLER)

    def _named_sampler_save(
        self, name: str, ttl: int | None, meta: dict[str, str] | None
    ) -> TwoPhase[str, SaveWeightsForSamplerResponse]:
        submission, collect = self._sampler_save(name, ttl, meta, "snapshot")

        async def public(request_id: str) -> SaveWeightsForSamplerResponse:
            internal = await collect(request_id)
            if internal.path is None:
                raise ValueError("save_weights_for_sampler: the server returned no path")
            return SaveWeightsForSamplerResponse(path=internal.path)

        return submission, public

    def save_weights_for_sampler(
        self, name: str, ttl_seconds: int | None = None, user_metadata: dict[str, str] | None = None
    ) -> APIFuture[SaveWeightsForSamplerResponse]:
        """Export sampler weights as ``tinker://{model_id}/sampler_weights/{name}``."""
        return run_two_phase(*self._named_sampler_save(name, ttl_seconds, user_metadata))

    async def save_weights_for_sampler_async(
        self, name: str, ttl_seconds: int | None = None, user_metadata: dict[str, str] | None = None
    ) -> APIFuture[SaveWeightsForSamplerResponse]:
        return await run_two_phase_async(
            *self._named_sampler_save(name, ttl_seconds, user_metadata)
        )

    def _save_and_sample(self, kind: str, stability: bool) -> Coroutine[Any, Any, SamplingClient]:
        from tx_client.sampling_client import SamplingClient

        submission, collect = self._sampler_save(None, None, None, kind)

        async def run() -> SamplingClient:
            internal = await collect(await submission)
            if internal.sampling_session_id is None:
                raise ValueError("save_weights_for_sampler returned no sampling_session_id")
            base = self._info.model_data.model_name
            return await SamplingClient.create(
                self.holder, internal.sampling_session_id, base, stability
            )

        return run()

    def save_weights_and_get_sampling_client(
        self, name: str | None = None, retry_config: Any = None,
        record_stability_info: bool = False, kind: str = "snapshot",
    ) -> SamplingClient:  # fmt: skip
        """Snapshot the current weights and return a SamplingClient bound to them."""
        coro = self._save_and_sample(kind, record_stability_info)
        return APIFuture.from_coroutine(coro).result()

    async def save_weights_and_get_sampling_client_async(
        self, name: str | None = None, retry_config: Any = None,
        record_stability_info: bool = False, kind: str = "snapshot",
    ) -> SamplingClient:  # fmt: skip
        return await run_async(self._save_and_sample(kind, record_stability_info))

    def create_sampling_client(
        self, model_path: str, retry_config: Any = None, record_stability_info: bool = False
    ) -> SamplingClient:
        """A SamplingClient for saved sampler weights (of any model)."""
        from tx_client.sampling_client import SamplingClient

        coro = SamplingClient.from_path(self.holder, model_path, None, record_stability_info)
        return APIFuture.from_coroutine(coro).result()

    async def create_sampling_client_async(
        self, model_path: str, retry_config: Any = None, record_stability_info: bool = False
    ) -> SamplingClient:
        from tx_client.sampling_client import SamplingClient

        return await run_async(
            SamplingClient.from_path(self.holder, model_path, None, record_stability_info)
        )

    # -- info -------------------------------------------------------------------------------
    def get_info(self) -> GetInfoResponse:
        """Model facts fetched at creation (no request)."""
        return self._info

    async def get_info_async(self) -> GetInfoResponse:
        return self._info

    def get_tokenizer(self) -> Any:
        """The model's tokenizer (``transformers`` is imported now, not at import time)."""
        name = self._info.model_data.model_name
        if name is None:
            raise ValueError("get_info().model_data.model_name is not set by the server")
        return load_tokenizer(tokenizer_id_for(name, self._info.model_data.tokenizer_id))


def _check_loss_type_input(loss_type_input: str | None) -> None:
    """As the SDK: warn that the parameter is deprecated; reject values it never supported."""
    if loss_type_input is None:
        return
    warnings.warn(
        "The 'loss_type_input' parameter of forward_backward_custom() is deprecated: the loss "
        "always receives logprobs. Remove it from your call.",
        DeprecationWarning,
        stacklevel=3,
    )
    if loss_type_input != "logprobs":
        raise ValueError(
            f"Unsupported loss_type_input={loss_type_input!r}. Supported values are: logprobs"
        )


def _drop_none(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if v is not None}
