"""One engine per served base model, and which adapter slot holds which training run.

Engines are built lazily, on the first request for their base model, and kept for the life of
the worker: building one loads the weights and compiles programs, which must happen once, not
per request. A base-model name is a local directory or a hub repo id resolved from the local
Hugging Face cache only (``local_files_only``): the worker never downloads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tx_engine.config import EngineConfig
from tx_engine.engine import TrainingEngine
from tx_server.errors import BadRequestError, ServerFaultError
from tx_server.settings import Settings

__all__ = ["EngineHost", "LoadedModel", "resolve_model_dir"]


def resolve_model_dir(name: str) -> Path:
    """The directory holding ``name``'s config and weights (local path or cached hub repo)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    import huggingface_hub

    try:
        return Path(
            huggingface_hub.snapshot_download(name, local_files_only=True, cache_dir=_hub_cache())
        )
    except Exception as exc:  # the hub client raises several unrelated types here
        raise ServerFaultError(
            f"base model {name!r} is neither a directory nor in the local Hugging Face cache "
            f"({type(exc).__name__}: {exc})"
        ) from None


def _hub_cache() -> str:
    """The hub cache named by the environment *now* (the hub client reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache", "huggingface"
    )
    return os.path.join(home, "hub")


@dataclass(frozen=True)
class LoadedModel:
    """A training run that lives in this worker: its engine and adapter slot."""

    base_model: str
    engine: TrainingEngine
    slot: int


class EngineHost:
    """The worker's engines and its map from training-run id to adapter slot."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._engines: dict[str, TrainingEngine] = {}
        self._models: dict[str, LoadedModel] = {}

    def engine(self, base_model: str) -> TrainingEngine:
        """The engine of a served base model, built on first use."""
        if base_model not in self.settings.base_models:
            raise BadRequestError(
                f"base_model {base_model!r} is not served; served: {self.settings.base_models}"
            )
        if base_model not in self._engines:
            config = EngineConfig(**self.settings.engine.engine_config_kwargs())
            self._engines[base_model] = TrainingEngine(resolve_model_dir(base_model), config)
        return self._engines[base_model]

    def add(self, model_id: str, base_model: str, slot: int) -> LoadedModel:
        """Record that ``model_id`` now occupies ``slot`` of ``base_model``'s engine."""
        loaded = LoadedModel(base_model, self.engine(base_model), slot)
        self._models[model_id] = loaded
        return loaded

    def get(self, model_id: str) -> LoadedModel:
        """The live training run; a server fault if this worker does not hold it."""
        loaded = self._models.get(model_id)
        if loaded is None:
            raise ServerFaultError(
                f"model {model_id!r} is not loaded in the worker (its in-memory state was lost "
                "when the worker restarted); create it again from a saved checkpoint"
            )
        return loaded

    def find(self, model_id: str) -> LoadedModel | None:
        """The live training run, or None."""
        return self._models.get(model_id)
