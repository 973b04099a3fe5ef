"""Configuration of the tx server: one pydantic-settings model, read from ``TX_*`` variables.

Why one model: ``tx serve`` flags, environment variables and tests all build the same
``Settings``, so there is exactly one place that names a knob and gives its default. Nested
values use ``__`` (``TX_ENGINE__MAX_LORA_RANK=64``); lists are JSON
(``TX_API_KEYS='["tml-a","tml-b"]'``).

The engine settings are plain data here on purpose: the API process must never import jax, so
the worker turns :class:`EngineSettings` into a ``tx_engine`` config itself
(:meth:`EngineSettings.engine_config_kwargs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ClientFlags", "EngineSettings", "Settings", "default_data_dir", "same_base_model"]


def default_data_dir() -> Path:
    """The per-user data directory (``~/.local/share/tx`` on Linux), never the package dir."""
    return Path(platformdirs.user_data_dir("tx", appauthor=False))


def same_base_model(a: str, b: str) -> bool:
    """Whether two base-model names name one model: equal but for trailing slashes (spec §8:
    a local directory is served with its ``/``, and scripts name it either way)."""
    return bool(a.rstrip("/")) and a.rstrip("/") == b.rstrip("/")


class EngineSettings(BaseModel):
    """Shapes and budgets of the worker's engine (names match ``tx_engine.EngineConfig``).

    ``max_seq_len`` and the ``sample_*`` fields are the server's own: the worker rejects
    longer inputs with a user error, caps one sampling batch, sizes its samplers' prefix caches
    and sets their decode steps per dispatch; the rest is passed to the engine unchanged.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_lora_adapters: int = Field(default=4, ge=1)
    max_lora_rank: int = Field(default=32, ge=1)
    max_seq_len: int = Field(default=4096, ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # EngineConfig's dtypes
    tokens_per_micro_batch: int = Field(default=2048, ge=1)
    """The engine's default: bounds activation memory (8×512 tokens train in < 3 GB on CPU);
    raise it on an accelerator with memory to spare (fewer, larger calls)."""
    sample_tokens_per_batch: int = Field(default=8192, ge=1)
    """KV-cache slots (rows × cache length) of one sampling batch. Resizing a batch (rows
    added for joining requests, idle rows dropped) holds the old and the new cache for a
    moment: up to 1.5× this, which is what to leave room for on an accelerator."""
    sample_prefix_cache_tokens: int = Field(default=8192, ge=0)
    """Token slots of each base model's prefix cache (0 = off): keys/values of prompts and
    finished samples, so a prompt that extends one (the next turn of a conversation or an RL
    episode, a shared system prompt) prefills only its new tokens. Memory on top of
    ``sample_tokens_per_batch``."""
    sample_decode_chunk: int = Field(default=8, ge=1)
    """Decode steps per sampling dispatch: the host checks stops and admits waiting requests
    between dispatches. More amortises the host's per-step cost (the larger cost of a decode
    step on an accelerator); fewer wastes fewer steps on rows that stop mid-dispatch."""
    min_seq_len: int = Field(default=16, ge=1)
    seq_len_buckets: tuple[int, ...] = ()
    batch_buckets: tuple[int, ...] = ()
    remat: bool = False
    mesh_dp: int = Field(default=1, ge=1)
    mesh_fsdp: int = Field(default=1, ge=1)
    mesh_tp: int = Field(default=1, ge=1)
    mesh_ep: int = Field(default=1, ge=1)

    _SERVER_ONLY: ClassVar[frozenset[str]] = frozenset(
        {
            "max_seq_len",
            "sample_tokens_per_batch",
            "sample_prefix_cache_tokens",
            "sample_decode_chunk",
        }
    )

    def engine_config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``tx_engine.config.EngineConfig`` (server-only keys dropped)."""
        return {k: v for k, v in self.model_dump().items() if k not in self._SERVER_ONLY}


class ClientFlags(BaseModel):
    """The fwd/bwd flags ``client/config`` hands to SDKs (spec §2.1); the rest stay default.

    Chunking is the client's job, so these are the knobs an operator has over request sizes:
    smaller chunks bound one request's memory, zstd trades CPU for bandwidth on slow links.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    proto_compress_fwdbwd: bool = False
    parallel_fwdbwd_chunks: bool = True
    fwdbwd_max_chunk_len: int = Field(
        default=1024,
        ge=1,
        description="Most datums per forward_backward request: the SDK splits a batch into "
        "requests of at most this many, and the server rejects a request with more as a user "
        "error (one oversized request would hold the worker for every tenant).",
    )
    fwdbwd_max_chunk_bytes_count: int = Field(
        default=5_000_000,
        ge=1,
        description="Estimated bytes per forward_backward request at which the SDK starts a "
        "new one (it charges 4 bytes per input token); also sets the default of "
        "Settings.max_fwdbwd_tokens.",
    )


class Settings(BaseSettings):
    """Every knob of ``tx serve``; see the module docstring for how to set them."""

    model_config = SettingsConfigDict(
        env_prefix="TX_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    database_url: str = Field(
        default_factory=lambda: f"sqlite:///{default_data_dir() / 'tx.db'}",
        description="SQLAlchemy URL: sqlite:///path or postgresql+psycopg://user@host/db",
    )
    checkpoint_root: Path = Field(default_factory=lambda: default_data_dir() / "checkpoints")
    compilation_cache_dir: Path | None = Field(
        default_factory=lambda: default_data_dir() / "jax-cache",
        description="The worker's persistent XLA compilation cache (a restart skips compiling "
        "what it compiled before); None (or an empty TX_COMPILATION_CACHE_DIR) disables it.",
    )
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Accepted API keys; each key is its own tenant. Empty + no file: any tml- key.",
    )
    api_keys_file: Path | None = Field(
        default=None, description="File with one 'KEY [TENANT]' per line; '#' starts a comment."
    )
    future_retention_seconds: float = Field(default=7 * 24 * 3600.0, gt=0)
    prune_interval_seconds: float = Field(default=600.0, gt=0)
    long_poll_seconds: float = Field(default=25.0, gt=0, le=40)
    future_recheck_seconds: float = Field(
        default=1.0, gt=0, description="Safety re-check of a waiting poll if a wake-up is lost."
    )
    max_pending_futures_per_tenant: int | None = Field(
        default=None, ge=1, description="Unfinished requests one tenant may queue; over it: 429."
    )
    max_pending_futures: int | None = Field(
        default=None, ge=1, description="Unfinished requests of all tenants together; over it: 429."
    )
    backpressure_retry_after_seconds: float = Field(
        default=1.0, gt=0, le=60, description="Retry-After of a 429 (the SDK honours 0-60 s)."
    )
    session_timeout_seconds: float | None = Field(
        default=600.0,
        ge=0,
        description="A session without heartbeat this long is 'expired'; 0 or None: never.",
    )
    checkpoint_min_ttl_seconds: int = Field(
        default=3600, ge=1, description="Smallest accepted ttl_seconds (the SDK documents 1 h)."
    )
    maintenance_interval_seconds: float = Field(
        default=30.0, gt=0, description="Period of session expiry and expired-checkpoint cleanup."
    )
    archive_url_ttl_seconds: float = Field(default=900.0, gt=0)
    archive_signing_key: SecretStr | None = Field(
        default=None,
        description="HMAC key of archive download URLs; unset: random per process (set it when "
        "several API processes serve one database, or links must survive a restart).",
    )
    sample_gather_seconds: float = Field(
        default=0.005,
        ge=0,
        le=1,
        description="After claiming sampling requests, the worker keeps claiming what is "
        "submitted within this many seconds of the last submission (at most 4 such gaps), so "
        "an RL group sent as one request per rollout runs as one batch; 0 turns it off. "
        "Sampling sessions that only ever send one request at a time skip it after their "
        "first few requests.",
    )
    training_share_while_sampling: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Training that arrives while a sampling batch decodes runs between two of "
        "its decode steps, taking at most this share of the time while both wait (after a "
        "break of t s the batch decodes t*(1-share)/share s); 0 makes training wait for the "
        "whole batch.",
    )
    max_num_samples: int = Field(
        default=1024,
        ge=1,
        description="Most samples one asample request may ask for (num_samples); a request "
        "over it fails at once as a user error naming num_samples. Bounds one request's work "
        "and its sample_sequence_ids.",
    )
    max_fwdbwd_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Most model-input tokens in one forward_backward request (all its datums "
        "together); over it the request fails at once as a user error. None: "
        "client.fwdbwd_max_chunk_bytes_count // 4 or engine.max_seq_len, whichever is larger, "
        "which no request of the SDK's chunker exceeds (it charges 4 bytes per token and sends "
        "a datum over the byte budget alone, and a longer datum fails anyway).",
    )
    max_fwdbwd_body_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1,
        description="Most bytes of one forward_backward HTTP body, both as sent and after zstd "
        "decompression; over it the request fails at once as a user error (the body is "
        "drained, never held in memory).",
    )
    base_models: list[str] = Field(default_factory=list)
    log_level: str = "info"
    engine: EngineSettings = Field(default_factory=EngineSettings)
    client: ClientFlags = Field(default_factory=ClientFlags)

    def served_base_model(self, name: str) -> str | None:
        """The served spelling of base model ``name``, or None if it is not served.

        Spec §8: a local directory is best served with a trailing ``/`` (the SDK's tokenizer
        heuristic cuts a name with exactly two slashes), while scripts name it either way.
        Names that differ only in trailing slashes are the same model; the served spelling,
        the one that loads, is what gets recorded and echoed back.
        """
        if name in self.base_models:
            return name
        return next((m for m in self.base_models if same_base_model(m, name)), None)

    @property
    def fwdbwd_token_limit(self) -> int:
        """The effective :attr:`max_fwdbwd_tokens` (its default resolved)."""
        if self.max_fwdbwd_tokens is not None:
            return self.max_fwdbwd_tokens
        return max(self.client.fwdbwd_max_chunk_bytes_count // 4, self.engine.max_seq_len)

    @field_validator("compilation_cache_dir", mode="before")
    @classmethod
    def _empty_means_off(cls, value: Any) -> Any:
        # An empty environment value would otherwise become Path("."): the current directory.
        # The same rule and default as tx_engine.compile_cache.cache_dir_from, which `tx train`
        # uses; written again here because the API process must not import tx_engine
        # (test_server_process), and a test checks that the two agree.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("database_url")
    @classmethod
    def _known_backend(cls, url: str) -> str:
        if not url.startswith(("sqlite", "postgresql")):
            raise ValueError(f"database_url must be a sqlite:// or postgresql:// URL, got {url!r}")
        return url

    @field_validator("base_models")
    @classmethod
    def _each_model_once(cls, models: list[str]) -> list[str]:
        # `tx serve --base-model A --base-model A` (or a name repeated in TX_BASE_MODELS) serves
        # A once: listed twice, get_server_capabilities would offer the same model twice.
        return list(dict.fromkeys(models))
