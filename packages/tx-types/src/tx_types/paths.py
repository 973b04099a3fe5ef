"""The ``tinker://`` checkpoint path grammar (spec §6.9), parsed in one place.

``tinker://{training_run_id}/{segment}/{name}`` with exactly three ``/``-separated parts after
the scheme; ``segment`` is ``weights`` (checkpoint type ``training``), ``sampler_weights``
(``sampler``) or ``external_weights`` (``external``) and ``checkpoint_id = "{segment}/{name}"``.

Why stricter than the SDK: the server turns names into directory names, so a name must match
``[A-Za-z0-9._-]+``, may not be ``.`` or ``..`` and is at most ``MAX_CHECKPOINT_NAME_BYTES``
long; a run id must be non-empty and free of whitespace, ``/``, ``\\``, ``?`` and ``#`` (it
contains ``:`` — ``{session}:train:{n}``).
Every rejection is an ``InvalidTinkerPathError`` (a ValueError) saying what is wrong.
"""

from __future__ import annotations

import re
from typing import Literal

from ._base import WireModel
from .errors import InvalidTinkerPathError

__all__ = [
    "CHECKPOINT_NAME_PATTERN",
    "MAX_CHECKPOINT_NAME_BYTES",
    "SEGMENT_TO_CHECKPOINT_TYPE",
    "TINKER_SCHEME",
    "CheckpointType",
    "ParsedCheckpointTinkerPath",
    "make_tinker_path",
    "validate_checkpoint_name",
]

CheckpointType = Literal["training", "sampler", "external"]

TINKER_SCHEME = "tinker://"
CHECKPOINT_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]+")
MAX_CHECKPOINT_NAME_BYTES = 200
"""A name is one directory name on the server, and file systems cap a name at 255 bytes
(NAME_MAX). 200 leaves room for the prefixes and suffixes that sibling temporary or renamed
directories add, and is far more than any real name needs; a longer one is rejected here, as
a validation error naming the field, instead of failing in the worker after it was queued."""
_RUN_ID_PATTERN = re.compile(r"[^\s/\\?#]+")
SEGMENT_TO_CHECKPOINT_TYPE: dict[str, CheckpointType] = {
    "weights": "training",
    "sampler_weights": "sampler",
    "external_weights": "external",
}
_TYPE_TO_SEGMENT = {v: k for k, v in SEGMENT_TO_CHECKPOINT_TYPE.items()}


def validate_checkpoint_name(name: str) -> str:
    """Return ``name`` if it is a safe checkpoint name, else raise InvalidTinkerPathError."""
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_CHECKPOINT_NAME_BYTES:
        raise InvalidTinkerPathError(
            f"invalid checkpoint name {name[:40]!r}…: {size} bytes long, the limit is "
            f"{MAX_CHECKPOINT_NAME_BYTES} bytes"
        )
    if not CHECKPOINT_NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise InvalidTinkerPathError(
            f"invalid checkpoint name {name!r}: use 1 to {MAX_CHECKPOINT_NAME_BYTES} characters "
            "from [A-Za-z0-9._-], not '.' or '..'"
        )
    return name


def _validate_run_id(run_id: str) -> str:
    if not _RUN_ID_PATTERN.fullmatch(run_id) or run_id in (".", ".."):
        raise InvalidTinkerPathError(
            f"invalid training run id {run_id!r}: must be non-empty without whitespace, "
            "'/', '\\', '?' or '#'"
        )
    return run_id


def make_tinker_path(training_run_id: str, checkpoint_type: CheckpointType, name: str) -> str:
    """Build ``tinker://{run}/{segment}/{name}``, validating both ids."""
    _validate_run_id(training_run_id)
    validate_checkpoint_name(name)
    return f"{TINKER_SCHEME}{training_run_id}/{_TYPE_TO_SEGMENT[checkpoint_type]}/{name}"


class ParsedCheckpointTinkerPath(WireModel):
    """The parts of a checkpoint path; build it with ``from_tinker_path``."""

    tinker_path: str
    training_run_id: str
    checkpoint_type: CheckpointType
    checkpoint_id: str
    """``{segment}/{name}``, e.g. ``weights/step-10`` (two URL segments in REST routes)."""

    @classmethod
    def from_tinker_path(cls, tinker_path: str) -> ParsedCheckpointTinkerPath:
        """Parse and validate; raises InvalidTinkerPathError naming the problem."""
        if not isinstance(tinker_path, str) or not tinker_path.startswith(TINKER_SCHEME):
            raise InvalidTinkerPathError(
                f"invalid tinker path {tinker_path!r}: must start with {TINKER_SCHEME!r}"
            )
        parts = tinker_path[len(TINKER_SCHEME) :].split("/")
        if len(parts) != 3:
            raise InvalidTinkerPathError(
                f"invalid tinker path {tinker_path!r}: expected "
                f"'{TINKER_SCHEME}<training_run_id>/<kind>/<name>' (3 parts), got {len(parts)}"
            )
        run_id, segment, name = parts
        if segment not in SEGMENT_TO_CHECKPOINT_TYPE:
            kinds = ", ".join(SEGMENT_TO_CHECKPOINT_TYPE)
            raise InvalidTinkerPathError(
                f"invalid tinker path {tinker_path!r}: unknown checkpoint kind {segment!r} "
                f"(expected one of {kinds})"
            )
        try:
            _validate_run_id(run_id)
            validate_checkpoint_name(name)
        except InvalidTinkerPathError as exc:
            raise InvalidTinkerPathError(f"invalid tinker path {tinker_path!r}: {exc}") from None
        return cls(
            tinker_path=tinker_path,
            training_run_id=run_id,
            checkpoint_type=SEGMENT_TO_CHECKPOINT_TYPE[segment],
            checkpoint_id=f"{segment}/{name}",
        )

    @property
    def kind(self) -> str:
        """The path segment: ``weights``, ``sampler_weights`` or ``external_weights``."""
        return self.checkpoint_id.split("/", 1)[0]

    @property
    def name(self) -> str:
        """The checkpoint name (last path part)."""
        return self.checkpoint_id.split("/", 1)[1]
