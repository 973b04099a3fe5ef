"""Typed errors of tx-engine.

One root exception, :class:`TxEngineError`, so callers (the server worker) can catch everything
the engine raises on purpose. Each subclass carries a wire ``category``: ``"user"`` when the
request or the files it names are at fault (bad config, missing checkpoint keys, bad adapter
slot), ``"server"`` when the engine itself failed. The server maps the category to the wire
error type in one table.
"""

from __future__ import annotations

from typing import ClassVar, Literal

ErrorCategory = Literal["user", "server"]


class TxEngineError(Exception):
    """Root of every error raised deliberately by tx-engine."""

    category: ClassVar[ErrorCategory] = "server"


class ConfigError(TxEngineError, ValueError):
    """A model config (HF ``config.json``) is missing a field or asks for an unsupported feature."""

    category: ClassVar[ErrorCategory] = "user"


class UnsupportedArchitectureError(ConfigError):
    """``architectures`` in ``config.json`` names a model class tx-engine does not implement."""


class CheckpointError(TxEngineError, ValueError):
    """Checkpoint files do not match the model: missing/unexpected keys or wrong shapes."""

    category: ClassVar[ErrorCategory] = "user"


class AdapterError(TxEngineError, ValueError):
    """A LoRA slot operation was asked for an invalid slot, rank or alpha."""

    category: ClassVar[ErrorCategory] = "user"


class NoFreeSlotError(AdapterError):
    """Every adapter slot is taken; free one or build the engine with more slots."""


class InputError(TxEngineError, ValueError):
    """A forward/backward or sampling request is malformed (bad token id, shape, loss name or
    config)."""

    category: ClassVar[ErrorCategory] = "user"
