"""Base models by name: a local directory, or a Hugging Face hub repo in the local cache.

The worker only ever reads the cache (``local_files_only``: it must not stall a request on a
multi-GB download). :func:`fetch_base_models` fills the cache when the server starts
(``tx serve`` / ``python -m tx_server``), before the API answers its health check, so that
``--base-model Qwen/Qwen3-8B`` works for a user with network access as it does for one
whose cache already holds the model, and a name that cannot be resolved stops the server at
start with its reason instead of a healthy server that fails every request for that model.
Offline (``HF_HUB_OFFLINE=1``) the cached copy is used, or the start fails naming the model.

This module imports no jax: the API process runs it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "WEIGHT_FILES",
    "BaseModelError",
    "check_local_path",
    "fetch_base_models",
    "hub_cache",
    "local_model_dir",
]

log = logging.getLogger(__name__)

WEIGHT_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*"]
"""What serving a model needs: config, safetensors weights, tokenizer and chat template files
(not the ``*.bin``/``*.pth`` copies that many repos also carry, which can double a download)."""


class BaseModelError(RuntimeError):
    """A served base model that is neither a directory nor obtainable from the hub."""


def hub_cache() -> str:
    """The hub cache named by the environment *now* (the hub client reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache", "huggingface"
    )
    return os.path.join(home, "hub")


def local_model_dir(name: str) -> Path | None:
    """``name`` as a directory if it is one (``~`` expanded), else None (a hub repo id)."""
    path = Path(name).expanduser()
    return path if path.is_dir() else None


def check_local_path(name: str) -> None:
    """BaseModelError if ``name`` is spelled as a path (``/``, ``.``, ``~``) but is no
    directory; any other name that is not a directory is a hub repo id."""
    if name.startswith(("/", ".", "~")) and local_model_dir(name) is None:
        raise BaseModelError(f"base model {name!r}: no such directory")


def fetch_base_models(names: Iterable[str]) -> None:
    """Download into the cache every hub-named model in ``names`` that it lacks.

    BaseModelError names the model and the reason when one cannot be had (no such
    directory, no such repo, no network and not cached).
    """
    for name in names:
        if local_model_dir(name) is not None:
            continue
        check_local_path(name)
        import huggingface_hub

        log.info("base model %s: fetching from the Hugging Face hub (if not cached)", name)
        try:
            huggingface_hub.snapshot_download(
                name, allow_patterns=WEIGHT_FILES, cache_dir=hub_cache()
            )
        except Exception as exc:  # the hub client raises many unrelated types
            raise BaseModelError(
                f"base model {name!r} is neither a directory nor obtainable from the Hugging "
                f"Face hub ({type(exc).__name__}: {exc})"
            ) from None
