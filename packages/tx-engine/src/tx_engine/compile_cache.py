"""Persistent XLA compilation cache: a restarted worker or a rerun reuses compiled programs.

The engine's programs are bucketed, so a long-lived process compiles each shape once; but every
process start paid for all of them again. For a multi-turn RL recipe against a freshly started
server on the tiny model that was ~110 s of XLA compilation (prefill/decode per batch and
cache bucket, training per length bucket), and ~9 s with this cache warm.

The cache is jax's own (keyed by the program's HLO, the jax/XLA versions and the device), so a
changed model, config or jax version simply misses. It is process-global: the first directory
set wins for the life of the process.

Where the cache lives is decided here too (:func:`default_cache_dir`, :func:`cache_dir_from`)
for `tx train`; `tx serve`'s settings keep a copy of the rule, because the API process must not
import tx_engine, and a tx-server test checks that both read every value alike. Choosing a
directory needs no jax, so jax is imported only when a cache is actually enabled.
"""

from __future__ import annotations

import logging
from pathlib import Path

import platformdirs

__all__ = ["cache_dir_from", "default_cache_dir", "enable_compilation_cache"]

log = logging.getLogger(__name__)

MIN_COMPILE_SECONDS = 0.2
"""Programs that compile faster than this are not written (jax's default is 1 s, which left
most of a tiny model's sampling programs out; reading an entry costs milliseconds)."""


def default_cache_dir() -> Path:
    """``jax-cache`` in the per-user data directory (``~/.local/share/tx/jax-cache`` on Linux).

    Per user, not per package or working directory, so every run of any tx command finds the
    programs an earlier one compiled.
    """
    return Path(platformdirs.user_data_dir("tx", appauthor=False)) / "jax-cache"


def cache_dir_from(value: str | None) -> Path | None:
    """The cache directory a raw setting names: unset (``None``) → :func:`default_cache_dir`,
    blank → ``None`` (no cache), anything else → that path (``~`` expanded).

    Why blank means off: it is the only way to unset a default through an environment
    variable, and taken as a path it would silently put the cache in the current directory.
    """
    if value is None:
        return default_cache_dir()
    return Path(value).expanduser() if value.strip() else None


def enable_compilation_cache(
    directory: Path | str, min_compile_seconds: float = MIN_COMPILE_SECONDS
) -> Path:
    """Cache compiled programs under ``directory`` (created) for this process and later ones.

    Returns the directory in effect, which is an earlier one if this process already set one:
    jax initialises its cache once, so switching directories mid-process would be silently
    ignored by part of it.
    """
    import jax  # here, not at the top: choosing a directory must not cost a jax import

    wanted = Path(directory).expanduser().resolve()
    current = jax.config.jax_compilation_cache_dir  # type: ignore[attr-defined]
    if current and Path(current) != wanted:
        log.warning("compilation cache already at %s; not switching to %s", current, wanted)
        return Path(current)
    wanted.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(wanted))  # type: ignore[no-untyped-call]
    jax.config.update(  # type: ignore[no-untyped-call]
        "jax_persistent_cache_min_compile_time_secs", min_compile_seconds
    )
    return wanted
