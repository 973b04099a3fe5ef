"""Sampling: sessions, parameters, the ``asample`` request and its result.

Validation follows what a sampler can honour and what the SDK legitimately sends:
``temperature`` ≥ 0 (0 = greedy), ``top_p`` in (0, 1], ``top_k`` = -1 (off) or ≥ 1, all finite;
``max_tokens`` ≥ 1 when present (absent = server default); ``stop`` is a string, a list of
strings or a list of token ids (``[]`` disables even EOS) — never a mixed list.

``SampledSequence.sequence_id`` is optional here although the SDK's client view requires it:
the id is not in the protobuf result, the client stamps it from the future's
``sample_sequence_ids``, so the codec must be able to build a sequence without one.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field, field_validator, model_validator

from ._base import Float32, Int32, Int64, TokenId, TokenIds, WireModel
from .model_input import ModelInput
from .tensor_data import TensorData

__all__ = [
    "CreateSamplingSessionRequest",
    "CreateSamplingSessionResponse",
    "GetSamplerResponse",
    "JoinSamplingSessionRequest",
    "JoinSamplingSessionResponse",
    "PromptAltTokens",
    "SampleRequest",
    "SampleResponse",
    "SampledSequence",
    "SamplingClientKind",
    "SamplingParams",
    "StopReason",
    "TopkLogprobsList",
]

StopReason = Literal["length", "stop"]
SamplingClientKind = Literal["snapshot", "inflight"]
"""``snapshot`` freezes the saved weights; ``inflight`` means "these weights or newer"."""

TopkLogprobsList = list[list[tuple[int, float]] | None]
"""Per position: up to k ``(token_id, logprob)`` pairs sorted by logprob, or None."""

_NonNegInt = Annotated[int, Field(ge=0)]


class SamplingParams(WireModel):
    """Decoding parameters; None fields are omitted on the wire."""

    max_tokens: Annotated[int, Field(ge=1)] | None = None
    seed: int | None = None
    stop: str | list[str] | list[TokenId] | None = None
    temperature: Annotated[Float32, Field(ge=0)] = 1.0
    top_k: int = -1
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0

    @field_validator("top_k")
    @classmethod
    def _check_top_k(cls, value: int) -> int:
        if value != -1 and value < 1:
            raise ValueError(f"top_k must be -1 (disabled) or >= 1, got {value}")
        return value


class SampleRequest(WireModel):
    """``POST /api/v1/asample`` (also ``compute_logprobs``) → future of ``SampleResponse``."""

    num_samples: Annotated[int, Field(ge=1)] = 1
    prompt: ModelInput
    sampling_params: SamplingParams
    base_model: str | None = None
    model_path: str | None = None
    sampling_session_id: str | None = None
    seq_id: Int64 | None = None
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: _NonNegInt = 0
    topk_sample_logprobs: _NonNegInt = 0
    target_prompt_logprobs: TensorData | None = None
    """int64 ``[len(prompt) - 1, K]`` token ids to score; -1 (or an unlisted CSR cell) = none."""
    prompt_alt_tokens_k: _NonNegInt = 0
    prompt_logprobs_last_n: Annotated[int, Field(ge=1)] | None = None
    record_stability_info: bool | None = None
    type: Literal["sample"] = "sample"

    @field_validator("target_prompt_logprobs")
    @classmethod
    def _check_targets(cls, value: TensorData | None) -> TensorData | None:
        if value is not None and (
            value.dtype != "int64" or value.shape is None or len(value.shape) != 2
        ):
            raise ValueError(
                f"target_prompt_logprobs must be a 2-D int64 tensor, got dtype {value.dtype} "
                f"shape {value.shape}"
            )
        return value

    @model_validator(mode="after")
    def _check_request(self) -> SampleRequest:
        if self.prompt_logprobs_last_n is not None and not self.prompt_logprobs:
            raise ValueError("prompt_logprobs_last_n requires prompt_logprobs=true")
        if self.sampling_session_id is None and self.base_model is None and self.model_path is None:
            raise ValueError("one of sampling_session_id, base_model or model_path is required")
        return self


class SampledSequence(WireModel):
    """One generated continuation; ``tokens`` include the stop token when ``stop_reason='stop'``."""

    stop_reason: StopReason
    sequence_id: str | None = None
    tokens: TokenIds
    logprobs: list[float] | None = None
    topk_logprobs: TopkLogprobsList | None = None

    @model_validator(mode="after")
    def _check_lengths(self) -> SampledSequence:
        if self.logprobs is not None and len(self.logprobs) != len(self.tokens):
            raise ValueError(
                f"logprobs has {len(self.logprobs)} entries but tokens has {len(self.tokens)}"
            )
        if self.topk_logprobs is not None and len(self.topk_logprobs) != len(self.tokens):
            raise ValueError(
                f"topk_logprobs has {len(self.topk_logprobs)} rows but tokens has "
                f"{len(self.tokens)}"
            )
        return self

    @property
    def tokens_np(self) -> npt.NDArray[np.int32]:
        return np.asarray(self.tokens, dtype=np.int32)

    @property
    def logprobs_np(self) -> npt.NDArray[np.float32] | None:
        return None if self.logprobs is None else np.asarray(self.logprobs, dtype=np.float32)


class PromptAltTokens(WireModel):
    """k independent draws per prompt position after the first: two ``[P-1, k]`` tensors."""

    tokens: TensorData
    logprobs: TensorData

    @model_validator(mode="after")
    def _same_shape(self) -> PromptAltTokens:
        if self.tokens.shape != self.logprobs.shape:
            raise ValueError(
                f"logprobs shape {self.logprobs.shape} must equal tokens shape {self.tokens.shape}"
            )
        return self


class SampleResponse(WireModel):
    """Result of ``asample`` (protobuf on the wire, see ``tx_types.proto``)."""

    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
    """``len(prompt)`` entries, None where not scored (always position 0)."""
    topk_prompt_logprobs: TopkLogprobsList | None = None
    target_prompt_logprobs: TensorData | None = None
    prompt_cache_hit_tokens: int = 0
    prompt_alt_tokens: PromptAltTokens | None = None

    @property
    def prompt_logprobs_np(self) -> npt.NDArray[np.float32] | None:
        """float32 view with NaN where ``prompt_logprobs`` has None."""
        if self.prompt_logprobs is None:
            return None
        values = [np.nan if x is None else x for x in self.prompt_logprobs]
        return np.asarray(values, dtype=np.float32)


def _tinker_prefix(value: str | None) -> str | None:
    if value is not None and not value.startswith("tinker://"):
        raise ValueError(f"model_path must start with 'tinker://', got {value!r}")
    return value


class CreateSamplingSessionRequest(WireModel):
    """``POST /api/v1/create_sampling_session``: sample a base model or saved weights."""

    session_id: str
    sampling_session_seq_id: Annotated[Int32, Field(ge=0)]
    base_model: str | None = None
    model_path: str | None = None
    type: Literal["create_sampling_session"] = "create_sampling_session"

    @field_validator("model_path")
    @classmethod
    def _check_path(cls, value: str | None) -> str | None:
        return _tinker_prefix(value)

    @model_validator(mode="after")
    def _one_source(self) -> CreateSamplingSessionRequest:
        if self.base_model is None and self.model_path is None:
            raise ValueError("one of base_model or model_path is required")
        return self


class CreateSamplingSessionResponse(WireModel):
    type: Literal["create_sampling_session"] = "create_sampling_session"
    sampling_session_id: str


class GetSamplerResponse(WireModel):
    """``GET /api/v1/samplers/{id}``; ``base_model`` is what the SDK loads the tokenizer from."""

    sampler_id: str
    base_model: str
    model_path: str | None = None


class JoinSamplingSessionRequest(WireModel):
    sampling_session_id: str
    type: Literal["join_sampling_session"] = "join_sampling_session"


class JoinSamplingSessionResponse(WireModel):
    type: Literal["join_sampling_session"] = "join_sampling_session"
    client_counter: int
