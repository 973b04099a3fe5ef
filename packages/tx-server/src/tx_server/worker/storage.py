"""Where checkpoints live on disk, and their rows in the ``checkpoints`` table.

Layout: ``{checkpoint_root}/{training_run_id}/{segment}/{name}/`` where ``segment`` is the
tinker-path segment (``weights``, ``sampler_weights``). Names are validated before they become
path parts, so a name can never escape its run directory. No jax here: the API process uses it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from tx_server.db.models import CheckpointRow
from tx_server.errors import BadRequestError
from tx_types.paths import validate_checkpoint_name

__all__ = [
    "EPHEMERAL_PREFIX",
    "SEGMENTS",
    "TYPES",
    "checkpoint_dir",
    "dir_size",
    "ephemeral_name",
    "find_checkpoint",
    "remove_dir",
]

SEGMENTS = {"training": "weights", "sampler": "sampler_weights", "external": "external_weights"}
TYPES = {segment: kind for kind, segment in SEGMENTS.items()}
EPHEMERAL_PREFIX = "ephemeral-"
"""Names of unnamed ``save_weights_for_sampler`` snapshots (``sampler_weights/ephemeral-{seq}``),
which have no checkpoint row: reserved, so a named checkpoint can never overwrite one or be
mistaken for one."""


def ephemeral_name(sampling_session_seq_id: int) -> str:
    """The directory name of the unnamed sampler snapshot of that sampling session."""
    return f"{EPHEMERAL_PREFIX}{sampling_session_seq_id}"


def checkpoint_dir(root: Path, run_id: str, checkpoint_type: str, name: str) -> Path:
    """The directory of one checkpoint; BadRequestError for an invalid name or type."""
    try:
        validate_checkpoint_name(name)
    except ValueError as exc:
        raise BadRequestError(f"checkpoint name {name!r}: {exc}") from None
    if checkpoint_type not in SEGMENTS or "/" in run_id or run_id in ("", ".", ".."):
        raise BadRequestError(f"invalid checkpoint location {run_id!r}/{checkpoint_type!r}")
    return root / run_id / SEGMENTS[checkpoint_type] / name


def find_checkpoint(session: Session, tinker_path: str) -> CheckpointRow | None:
    """The checkpoint row registered under ``tinker_path``, if any."""
    return session.scalar(select(CheckpointRow).where(CheckpointRow.tinker_path == tinker_path))


def dir_size(path: Path) -> int:
    """Total bytes of the files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def remove_dir(path: Path) -> None:
    """Delete a checkpoint directory (missing is fine: the row is the source of truth)."""
    shutil.rmtree(path, ignore_errors=True)
