"""Reading Hugging Face ``config.json`` dicts with errors that name the missing field."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tx_engine.errors import ConfigError


def require(d: Mapping[str, Any], key: str, kind: type) -> Any:
    """``d[key]`` converted to ``kind``; a clear :class:`ConfigError` if absent or malformed."""
    if key not in d or d[key] is None:
        raise ConfigError(f"config.json is missing required field {key!r}")
    try:
        return kind(d[key])
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"config.json field {key!r}={d[key]!r} is not a valid {kind.__name__}"
        ) from e


def rope_settings(d: Mapping[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """``(rope_theta, rope_scaling items)`` from either config format.

    transformers ≥ 5 writes ``rope_parameters`` (theta inside); hub checkpoints written by
    older versions have a top-level ``rope_theta`` and an optional ``rope_scaling`` dict.
    """
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        raise ConfigError("config.json field 'rope_parameters'/'rope_scaling' must be an object")
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        return theta, None
    return theta, tuple(sorted(scaling.items()))


def reject_if(d: Mapping[str, Any], key: str, message: str) -> None:
    """Fail loudly on a config feature we do not implement rather than computing wrong logits."""
    if d.get(key):
        raise ConfigError(f"config.json field {key!r}={d[key]!r}: {message}")
