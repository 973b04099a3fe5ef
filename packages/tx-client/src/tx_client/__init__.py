"""tx-client: a light httpx SDK with the public API of the official ``tinker`` SDK 0.38.0.

Switch an existing script with one import: ``import tx_client as tinker`` and
``from tx_client import types``. Depends only on ``tx-types`` and ``httpx``; ``transformers``
(tokenizers), ``torch`` and ``jax`` (custom losses) are imported only when a call needs them.

Modules: ``_http`` (transport, retries), ``_errors`` (exceptions), ``_loop`` (background event
loop), ``_futures`` (``APIFuture``, result polling), ``_session`` (bootstrap, heartbeat,
finish), ``_chunking`` / ``_metrics`` (forward/backward batching and result merging),
``_custom_loss``, ``_tokenizer``, and one module per public client.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from tx_client import types
from tx_client._errors import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    BillingError,
    ConflictError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestFailedError,
    TinkerError,
    UnprocessableEntityError,
)
from tx_client._futures import APIFuture
from tx_client.rest_client import RestClient
from tx_client.sampling_client import SamplingClient
from tx_client.service_client import ServiceClient
from tx_client.training_client import TrainingClient

# The wire types the SDK also exports at top level (``tinker.AdamParams`` …).
from tx_types import (
    AdamOptimizerConfig,
    AdamParams,
    Checkpoint,
    CheckpointType,
    Datum,
    DimuonOptimizerConfig,
    DimuonParams,
    DmelChunk,
    EncodedTextChunk,
    ForwardBackwardOutput,
    LoraConfig,
    ModelID,
    ModelInput,
    ModelInputChunk,
    OptimParams,
    OptimStepRequest,
    OptimStepResponse,
    ParsedCheckpointTinkerPath,
    PromptProvenanceSpan,
    SampledProvenanceSpan,
    SampledSequence,
    SampleRequest,
    SampleResponse,
    SamplingParams,
    StopReason,
    TensorData,
    TensorDtype,
    TrainingRun,
)

try:
    __version__ = _version("tx-client")
except PackageNotFoundError:  # a source checkout on PYTHONPATH (e.g. an accelerator box)
    __version__ = "0+source"

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIFuture",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AdamOptimizerConfig",
    "AdamParams",
    "AuthenticationError",
    "BadRequestError",
    "BillingError",
    "Checkpoint",
    "CheckpointType",
    "ConflictError",
    "Datum",
    "DimuonOptimizerConfig",
    "DimuonParams",
    "DmelChunk",
    "EncodedTextChunk",
    "ForwardBackwardOutput",
    "InternalServerError",
    "LoraConfig",
    "ModelID",
    "ModelInput",
    "ModelInputChunk",
    "NotFoundError",
    "OptimParams",
    "OptimStepRequest",
    "OptimStepResponse",
    "ParsedCheckpointTinkerPath",
    "PermissionDeniedError",
    "PromptProvenanceSpan",
    "RateLimitError",
    "RequestFailedError",
    "RestClient",
    "SampleRequest",
    "SampleResponse",
    "SampledProvenanceSpan",
    "SampledSequence",
    "SamplingClient",
    "SamplingParams",
    "ServiceClient",
    "StopReason",
    "TensorData",
    "TensorDtype",
    "TinkerError",
    "TrainingClient",
    "TrainingRun",
    "UnprocessableEntityError",
    "__version__",
    "types",
]
