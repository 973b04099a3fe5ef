"""Dataset loaders of `tx train`, resolved by their documented names.

The documented names are ``tx.loaders.text`` and ``tx.loaders.chat`` (see :data:`LOADERS`);
they are names, not modules, so there is no top-level ``tx`` package to collide with. Any
other ``package.module.function`` is imported, which is how users plug in their own loader
with the signature ``fn(dataset, tokenizer, max_length) -> list[Example]``.
"""

from __future__ import annotations

import importlib

from tx_cli.loaders.base import Example, Loader, TrainInputError, shifted_example
from tx_cli.loaders.chat import load_chat
from tx_cli.loaders.text import load_text

LOADERS: dict[str, Loader] = {
    "tx.loaders.text": load_text,
    "tx.loaders.chat": load_chat,
}


def resolve_loader(name: str) -> Loader:
    """The loader registered as ``name``, else the importable callable ``module.function``."""
    if name in LOADERS:
        return LOADERS[name]
    module_name, _, attr = name.rpartition(".")
    known = ", ".join(LOADERS)
    if not module_name:
        raise TrainInputError(f"unknown loader {name!r}; use one of {known} or module.function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise TrainInputError(
            f"unknown loader {name!r}: cannot import {module_name!r} ({e})"
        ) from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise TrainInputError(f"unknown loader {name!r}: {module_name} has no function {attr!r}")
    loader: Loader = fn
    return loader


__all__ = ["LOADERS", "Example", "Loader", "TrainInputError", "resolve_loader", "shifted_example"]
