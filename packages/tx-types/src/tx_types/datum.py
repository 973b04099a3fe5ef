"""Datum: one training example (model input + per-token loss inputs + optional provenance).

Why conversion lives here: user code hands ``loss_fn_inputs`` as numpy arrays, torch tensors or
plain lists, and the SDK converts them on construction. We do the same — numpy/torch via
``TensorData.from_numpy``/``from_torch`` (2-D torch ``target_tokens``/``weights`` become sparse
CSR when smaller, like the SDK), plain lists with the dtype of spec §6.3 (``target_tokens``
int64, the float inputs float32). torch is detected through ``sys.modules`` so this module never
imports it.

Why validation lives here: position *i* of ``model_input`` predicts ``target_tokens[i]``, so a
Datum whose shapes disagree can never be trained on. We reject it at construction with the
field named: ``len(target_tokens) == model_input.length`` (when the length is computable),
``weights.shape == target_tokens.shape``, the leading dimension of the other per-token inputs,
integer targets ≥ 0, and finite float inputs.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any, Literal, get_args

import numpy as np
from pydantic import Discriminator, Field, Tag, model_validator

from ._base import WireModel
from .model_input import ModelInput
from .tensor_data import TensorData

__all__ = [
    "LOSS_FN_TYPES",
    "Datum",
    "LossFnInputs",
    "LossFnOutput",
    "LossFnType",
    "PromptProvenanceSpan",
    "ProvenanceSpan",
    "ProvenanceSpans",
    "SampledProvenanceSpan",
]

LossFnType = Literal[
    "cross_entropy",
    "importance_sampling",
    "ppo",
    "cispo",
    "dro",
    "gspo",
    "stable_reinforce",
    "custom",
]
"""Wire names of the loss functions (the engine's loss registry must use the same keys)."""

LOSS_FN_TYPES: tuple[str, ...] = get_args(LossFnType)

LossFnInputs = dict[str, TensorData]
LossFnOutput = dict[str, TensorData]

# Dtype of each known input when given as a plain list (spec §6.3); other keys infer theirs.
_KEY_TO_DTYPE = {
    "target_tokens": np.int64,
    "weights": np.float32,
    "advantages": np.float32,
    "logprobs": np.float32,
    "clip_low_threshold": np.float32,
    "clip_high_threshold": np.float32,
    "sequence_ratio_mask": np.float32,
}
_SPARSE_ELIGIBLE_KEYS = frozenset({"target_tokens", "weights"})
# Per-token inputs whose leading dimension must equal len(target_tokens).
_PER_TOKEN_KEYS = ("weights", "advantages", "logprobs", "sequence_ratio_mask")


class PromptProvenanceSpan(WireModel):
    """Positions ``[offset, offset+length)`` of a sampled sequence's *prompt*."""

    sequence_id: Annotated[str, Field(min_length=1)]
    offset: Annotated[int, Field(ge=0)] = 0
    length: Annotated[int, Field(ge=0)]
    type: Literal["prompt_tokens"] = "prompt_tokens"


class SampledProvenanceSpan(WireModel):
    """Positions ``[offset, offset+length)`` of a sampled sequence's *sampled tokens*."""

    sequence_id: Annotated[str, Field(min_length=1)]
    offset: Annotated[int, Field(ge=0)] = 0
    length: Annotated[int, Field(ge=0)]
    type: Literal["sampled_tokens"] = "sampled_tokens"


def _span_type(value: Any) -> str | None:
    """``type`` tag when present; SDK dataclasses have none, so fall back to the class name."""
    if isinstance(value, dict):
        return value.get("type")
    tag = getattr(value, "type", None)
    if tag is not None:
        return str(tag)
    return {
        "PromptProvenanceSpan": "prompt_tokens",
        "SampledProvenanceSpan": "sampled_tokens",
    }.get(type(value).__name__)


ProvenanceSpan = Annotated[
    Annotated[PromptProvenanceSpan, Tag("prompt_tokens")]
    | Annotated[SampledProvenanceSpan, Tag("sampled_tokens")],
    Discriminator(_span_type),
]
ProvenanceSpans = list[ProvenanceSpan]


def _is_torch_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def convert_loss_fn_input(key: str, value: Any) -> Any:
    """Turn an array-like loss input into TensorData (anything else is left to validation)."""
    if _is_torch_tensor(value):
        if key in _SPARSE_ELIGIBLE_KEYS and value.ndim == 2:
            return TensorData.from_torch_sparse(value)
        return TensorData.from_torch(value)
    if isinstance(value, np.ndarray):
        return TensorData.from_numpy(value)
    if isinstance(value, (list, tuple)):
        try:
            array = np.asarray(value)
        except ValueError:
            raise ValueError(
                f"loss_fn_inputs[{key!r}] must be a rectangular numeric array; "
                "ragged nested lists are not supported"
            ) from None
        if array.dtype.kind not in "fiub":
            raise ValueError(f"loss_fn_inputs[{key!r}] must be numeric, got {array.dtype}")
        target = _KEY_TO_DTYPE.get(key)
        if target is None:
            target = np.float32 if array.dtype.kind == "f" else np.int64
        return TensorData.from_numpy(array.astype(target))
    return value


class Datum(WireModel):
    """One example: ``model_input`` plus named ``loss_fn_inputs`` aligned with it."""

    loss_fn_inputs: LossFnInputs = Field(default_factory=dict)
    model_input: ModelInput
    model_input_spans: ProvenanceSpans | None = None
    loss_fn_input_spans: ProvenanceSpans | None = None

    @model_validator(mode="before")
    @classmethod
    def _convert_arrays(cls, value: Any) -> Any:
        if isinstance(value, dict) and isinstance(value.get("loss_fn_inputs"), dict):
            value = dict(value)
            value["loss_fn_inputs"] = {
                k: convert_loss_fn_input(k, v) for k, v in value["loss_fn_inputs"].items()
            }
        return value

    @model_validator(mode="after")
    def _check_alignment(self) -> Datum:
        if (self.model_input_spans is None) != (self.loss_fn_input_spans is None):
            raise ValueError(
                "model_input_spans and loss_fn_input_spans come as a pair: set both or neither"
            )
        for key, tensor in self.loss_fn_inputs.items():
            if tensor.dtype == "float32" and not np.all(np.isfinite(tensor.data)):
                raise ValueError(f"loss_fn_inputs[{key!r}] must be finite (no NaN/inf)")
        target = self.loss_fn_inputs.get("target_tokens")
        if target is not None:
            self._check_targets(target)
        return self

    def _check_targets(self, target: TensorData) -> None:
        if target.dtype != "int64":
            raise ValueError("loss_fn_inputs['target_tokens'] must be int64 token ids")
        if target.data and min(target.data) < 0:
            raise ValueError("loss_fn_inputs['target_tokens'] must be non-negative token ids")
        shape = _shape_of(target)
        if not shape:
            raise ValueError("loss_fn_inputs['target_tokens'] must be at least 1-D")
        length = _length_or_none(self.model_input)
        if length is not None and shape[0] != length:
            raise ValueError(
                f"len(loss_fn_inputs['target_tokens']) = {shape[0]} must equal "
                f"model_input.length = {length} (position i predicts target_tokens[i])"
            )
        weights = self.loss_fn_inputs.get("weights")
        if weights is not None and _shape_of(weights) != shape:
            raise ValueError(
                f"loss_fn_inputs['weights'] shape {_shape_of(weights)} must equal "
                f"target_tokens shape {shape}"
            )
        for key in _PER_TOKEN_KEYS[1:]:
            other = self.loss_fn_inputs.get(key)
            if other is not None and _shape_of(other)[:1] != shape[:1]:
                raise ValueError(
                    f"loss_fn_inputs[{key!r}] shape {_shape_of(other)} must start with "
                    f"len(target_tokens) = {shape[0]}"
                )

    def with_provenance(
        self, model_input: ProvenanceSpans, loss_fn_inputs: ProvenanceSpans
    ) -> Datum:
        """Copy with provenance spans, checking that each list tiles its field exactly."""
        _check_tiling("model_input", model_input, self.model_input.length)
        target = self.loss_fn_inputs.get("target_tokens")
        if target is not None and len(_shape_of(target)) == 1:
            _check_tiling("loss_fn_inputs", loss_fn_inputs, _shape_of(target)[0])
        return self.model_copy(
            update={"model_input_spans": model_input, "loss_fn_input_spans": loss_fn_inputs}
        )


def _shape_of(tensor: TensorData) -> list[int]:
    return list(tensor.shape) if tensor.shape is not None else [len(tensor.data)]


def _length_or_none(model_input: ModelInput) -> int | None:
    """``model_input.length``, or None when a chunk cannot tell (image without expected_tokens)."""
    try:
        return model_input.length
    except ValueError:
        return None


def _check_tiling(kwarg: str, spans: ProvenanceSpans, expected: int) -> None:
    total = sum(span.length for span in spans)
    if total != expected:
        raise ValueError(
            f"with_provenance {kwarg} spans cover {total} positions but the field has "
            f"{expected}; the runs must tile it exactly"
        )
