"""``SamplingClient``: text generation and prompt scoring against one sampling session.

Each ``sample`` POSTs ``asample`` with this client's next ``seq_id`` (a transport retry re-sends
the same ``seq_id`` so the server can deduplicate), then polls the protobuf ``SampleResponse``
and stamps the submission's ``sample_sequence_ids`` onto the sequences. If the server reports
the future as expired (410), the whole sample is re-submitted under a new ``seq_id``.

Arguments are checked as the SDK checks them: the few it rejects in ``sample()`` itself raise
``ValueError`` at once; the wire request is built inside the future, so values the wire types
reject fail at ``.result()`` as a user-category ``RequestFailedError``, where the SDK surfaces
the server's verdict. As in the SDK, a client pickles (or travels as
:meth:`SamplingClient.get_sampler_handle`) to worker processes.
"""

from __future__ import annotations

import base64
import itertools
import json
import secrets
import threading
from collections.abc import Callable, Mapping
from typing import Any

from tx_client._backcompat import ResolvedClientFuture
from tx_client._errors import APIStatusError, invalid_request
from tx_client._futures import APIFuture, ResultDecoder, poll_result
from tx_client._http import Transport
from tx_client._session import SessionHolder
from tx_client._tokenizer import load_tokenizer, tokenizer_id_for
from tx_types import (
    CreateSamplingSessionRequest,
    CreateSamplingSessionResponse,
    GetSamplerResponse,
    ModelInput,
    SampleRequest,
    SampleResponse,
    SamplingParams,
    TensorData,
    UntypedAPIFuture,
)
from tx_types.proto import decode_sample_response

__all__ = ["SamplingClient"]

_MAX_EXPIRED_RESUBMITS = 3
_LOGPROB_PARAMS = SamplingParams(max_tokens=1, temperature=1.0, top_k=-1, top_p=1.0)


class SamplingClient(ResolvedClientFuture):
    """Sample from a base model or saved weights. Create it with a ServiceClient or a
    TrainingClient (``create_sampling_client`` / ``save_weights_and_get_sampling_client``)."""

    def __init__(
        self, holder: SessionHolder, sampling_session_id: str, base_model: str,
        record_stability_info: bool = False,
    ) -> None:  # fmt: skip
        self.holder = holder
        self._record_stability_info = record_stability_info
        self.sampling_session_id = sampling_session_id
        self._base_model = base_model
        self._seq = itertools.count()
        self._seq_lock = threading.Lock()

    # -- passing a sampler to other processes (pickle, or a credential-free handle) ---------
    def _state(self) -> dict[str, Any]:
        transport = self.holder.transport
        return {
            "base_url": transport.base_url,
            "default_headers": transport.default_headers,
            "session_id": self.holder.session_id,
            "sampling_session_id": self.sampling_session_id,
            "base_model": self._base_model,
            "record_stability_info": self._record_stability_info,
        }

    def __reduce__(self) -> tuple[Callable[..., SamplingClient], tuple[dict[str, Any], str]]:
        """Picklable, as in the SDK, so a sampler can be handed to worker processes."""
        return (_clone, (self._state(), self.holder.transport.api_key))

    def get_sampler_handle(self) -> str:
        """A string naming this sampler, without credentials: rebuild a client from it in any
        process with :meth:`from_sampler_handle`."""
        return base64.urlsafe_b64encode(json.dumps(self._state()).encode()).decode()

    @staticmethod
    def from_sampler_handle(handle: str, *, api_key: str | None = None) -> SamplingClient:
        """A client for the sampler behind ``handle``; the key is ``api_key`` or resolved as
        for ``ServiceClient()``."""
        return _clone(json.loads(base64.urlsafe_b64decode(handle)), api_key)

    @classmethod
    async def create(
        cls, holder: SessionHolder, sampling_session_id: str, base_model: str | None,
        record_stability_info: bool = False,
    ) -> SamplingClient:  # fmt: skip
        """Bind to an existing sampling session; ask the server for its base model if unknown."""
        if base_model is None:
            sampler = await holder.get(f"samplers/{sampling_session_id}", GetSamplerResponse)
            base_model = sampler.base_model
        return cls(holder, sampling_session_id, base_model, record_stability_info)

    @classmethod
    async def from_path(
        cls, holder: SessionHolder, model_path: str | None = None, base_model: str | None = None,
        record_stability_info: bool = False,
    ) -> SamplingClient:  # fmt: skip
        """``create_sampling_session`` for saved weights or a base model, then bind to it."""
        if model_path is None and base_model is None:
            raise ValueError("either model_path or base_model must be given")
        if model_path is not None and not model_path.startswith("tinker://"):
            raise ValueError(f"model_path must start with 'tinker://', got {model_path!r}")
        session_id = await holder.ensure_session()
        request = CreateSamplingSessionRequest(
            session_id=session_id,
            sampling_session_seq_id=holder.next_sampling_session_seq_id(),
            base_model=base_model,
            model_path=model_path,
        )
        answer = await holder.post(
            "create_sampling_session", request, CreateSamplingSessionResponse
        )
        return await cls.create(
            holder, answer.sampling_session_id, base_model, record_stability_info
        )

    def _next_seq_id(self) -> int:
        with self._seq_lock:
            return next(self._seq)

    async def _sample_once(self, request: SampleRequest) -> SampleResponse:
        body = request.model_copy(update={"seq_id": self._next_seq_id()})
        headers = {"X-Tinker-Sampling-Backpressure": "1"}
        future = await self.holder.post("asample", body, UntypedAPIFuture, headers=headers)
        ids = future.sample_sequence_ids
        if ids is None or len(ids) != request.num_samples:
            raise ValueError(
                f"asample answered {0 if ids is None else len(ids)} sample_sequence_ids "
                f"for num_samples={request.num_samples}"
            )

        def decode(body: bytes) -> SampleResponse:
            return decode_sample_response(body, ids)

        decoder = ResultDecoder[SampleResponse]("Sample", proto=decode)
        return await poll_result(self.holder.transport, future.request_id, decoder)

    async def _sample(self, build: Callable[[], SampleRequest]) -> SampleResponse:
        request = build()
        for attempt in range(_MAX_EXPIRED_RESUBMITS + 1):
            try:
                return await self._sample_once(request)
            except APIStatusError as exc:
                if exc.status_code != 410 or attempt == _MAX_EXPIRED_RESUBMITS:
                    raise
        raise AssertionError("unreachable")

    def _request(
        self,
        prompt: ModelInput,
        num_samples: int,
        sampling_params: SamplingParams | Mapping[str, Any],
        include_prompt_logprobs: bool,
        topk_prompt_logprobs: int,
        topk_sample_logprobs: int,
        target_prompt_logprobs: TensorData | None,
        prompt_alt_tokens_k: int,
        prompt_logprobs_last_n: int | None,
    ) -> Callable[[], SampleRequest]:
        """Check the arguments the SDK checks at call time (``ValueError`` now); return a
        builder of the wire request, called inside the future so that arguments the wire type
        rejects fail at ``.result()`` as a user-category ``RequestFailedError``, as the server
        reports them to the official SDK."""
        _check_sample_args(
            include_prompt_logprobs, target_prompt_logprobs, prompt_alt_tokens_k,
            prompt_logprobs_last_n,
        )  # fmt: skip

        def build() -> SampleRequest:
            with invalid_request("sample"):
                return SampleRequest(
                    num_samples=num_samples,
                    prompt=prompt,
                    sampling_params=SamplingParams.model_validate(sampling_params),
                    sampling_session_id=self.sampling_session_id,
                    prompt_logprobs=include_prompt_logprobs,
                    topk_prompt_logprobs=topk_prompt_logprobs,
                    topk_sample_logprobs=topk_sample_logprobs,
                    target_prompt_logprobs=target_prompt_logprobs,
                    prompt_alt_tokens_k=prompt_alt_tokens_k,
                    prompt_logprobs_last_n=prompt_logprobs_last_n,
                    record_stability_info=self._record_stability_info,
                )

        return build

    def sample(
        self,
        prompt: ModelInput,
        num_samples: int,
        sampling_params: SamplingParams | Mapping[str, Any],
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        topk_sample_logprobs: int = 0,
        target_prompt_logprobs: TensorData | None = None,
        prompt_alt_tokens_k: int = 0,
        prompt_logprobs_last_n: int | None = None,
    ) -> APIFuture[SampleResponse]:
        """Generate ``num_samples`` continuations of ``prompt``."""
        build = self._request(
            prompt, num_samples, sampling_params, include_prompt_logprobs, topk_prompt_logprobs,
            topk_sample_logprobs, target_prompt_logprobs, prompt_alt_tokens_k,
            prompt_logprobs_last_n,
        )  # fmt: skip
        return APIFuture.from_coroutine(self._sample(build))

    async def sample_async(
        self,
        prompt: ModelInput,
        num_samples: int,
        sampling_params: SamplingParams | Mapping[str, Any],
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        topk_sample_logprobs: int = 0,
        target_prompt_logprobs: TensorData | None = None,
        prompt_alt_tokens_k: int = 0,
        prompt_logprobs_last_n: int | None = None,
    ) -> SampleResponse:
        """Awaitable form of :meth:`sample` (same arguments; returns the response)."""
        return await self.sample(
            prompt, num_samples, sampling_params, include_prompt_logprobs, topk_prompt_logprobs,
            topk_sample_logprobs, target_prompt_logprobs, prompt_alt_tokens_k,
            prompt_logprobs_last_n,
        )  # fmt: skip

    async def _logprobs(self, build: Callable[[], SampleRequest]) -> list[float | None]:
        response = await self._sample(build)
        if response.prompt_logprobs is None:
            raise ValueError("the server returned no prompt_logprobs")
        return list(response.prompt_logprobs)

    def compute_logprobs(
        self, prompt: ModelInput, prompt_logprobs_last_n: int | None = None
    ) -> APIFuture[list[float | None]]:
        """Logprob of every prompt token given its prefix (``None`` first)."""
        build = self._request(
            prompt, 1, _LOGPROB_PARAMS, True, 0, 0, None, 0, prompt_logprobs_last_n
        )
        return APIFuture.from_coroutine(self._logprobs(build))

    async def compute_logprobs_async(
        self, prompt: ModelInput, prompt_logprobs_last_n: int | None = None
    ) -> list[float | None]:
        return await self.compute_logprobs(prompt, prompt_logprobs_last_n)

    def get_base_model(self) -> str:
        return self._base_model

    async def get_base_model_async(self) -> str:
        return self._base_model

    def get_tokenizer(self) -> Any:
        """Tokenizer of the base model (``transformers`` is imported only now)."""
        return load_tokenizer(tokenizer_id_for(self._base_model))


def _clone(state: dict[str, Any], api_key: str | None) -> SamplingClient:
    """A client on its own connection for the same sampling session (no new session, no
    heartbeat). Its ``seq_id``s start at a random multiple of 10⁹, as the SDK's clones do, so
    that copies sampling concurrently never reuse an id the server would deduplicate."""
    transport = Transport(state["base_url"], api_key, default_headers=state["default_headers"])
    holder = SessionHolder(transport)
    holder.session_id = state["session_id"]
    client = SamplingClient(
        holder, state["sampling_session_id"], state["base_model"], state["record_stability_info"]
    )
    client._seq = itertools.count(1_000_000_000 * (secrets.randbelow(1_000_000_000) + 1))
    return client


def _check_sample_args(
    include_prompt_logprobs: bool,
    target_prompt_logprobs: TensorData | None,
    prompt_alt_tokens_k: int,
    prompt_logprobs_last_n: int | None,
) -> None:
    """The official SDK's call-time checks: a ``ValueError`` before anything is submitted."""
    if target_prompt_logprobs is not None:
        if target_prompt_logprobs.dtype != "int64":
            raise ValueError(
                "target_prompt_logprobs must be an int64 tensor of token ids, "
                f"got {target_prompt_logprobs.dtype}"
            )
        if target_prompt_logprobs.shape is None or len(target_prompt_logprobs.shape) != 2:
            raise ValueError(
                "target_prompt_logprobs must be 2-D, [len(prompt) - 1, K], "
                f"got shape {target_prompt_logprobs.shape}"
            )
    if prompt_alt_tokens_k < 0:
        raise ValueError(f"prompt_alt_tokens_k must be 0 or greater, got {prompt_alt_tokens_k}")
    if prompt_logprobs_last_n is not None:
        if prompt_logprobs_last_n < 1:
            raise ValueError(
                f"prompt_logprobs_last_n must be 1 or greater, got {prompt_logprobs_last_n}"
            )
        if not include_prompt_logprobs:
            raise ValueError(
                "prompt_logprobs_last_n applies to prompt logprobs; set include_prompt_logprobs"
            )
