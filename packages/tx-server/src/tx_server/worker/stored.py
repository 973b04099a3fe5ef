"""Reading the server's own checkpoints back into adapter slots.

The engine calls a checkpoint it cannot read a :class:`~tx_engine.errors.CheckpointError`, of
category ``user``: for ``tx train`` the files are the user's. Here the server wrote them itself
and checked a load's compatibility in the API before queueing it, so one that fails to read
was damaged behind the server's back (a disk, an operator): a ``server`` fault (spec §10.8),
reported without the storage path, which the log keeps.
"""

from __future__ import annotations

from pathlib import Path

from tx_engine.engine import TrainingEngine
from tx_engine.errors import CheckpointError
from tx_server.errors import ServerFaultError

__all__ = ["load_stored"]


def load_stored(
    engine: TrainingEngine, path: str | Path, *, slot: int | None, with_optimizer: bool
) -> int:
    """``engine.load_adapter`` of a checkpoint in the server's storage; its slot."""
    try:
        return engine.load_adapter(path, slot=slot, with_optimizer=with_optimizer)
    except CheckpointError as exc:
        raise ServerFaultError(
            f"a stored checkpoint could not be read ({type(exc).__name__}: it is damaged or "
            "incomplete on the server's disk); the server log has the details"
        ) from exc
