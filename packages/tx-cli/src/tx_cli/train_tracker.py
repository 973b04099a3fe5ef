"""Experiment trackers of `tx train` (``--tracker``): a ``log(metrics, step)`` callable.

W&B is the one tracker. ``--tracker-args`` are passed to ``wandb.init`` as keyword arguments,
so every W&B option works unchanged — ``{"mode": "offline", "dir": ...}`` runs without network
and writes ``<dir>/wandb/offline-run-*/run-*.wandb`` for a later ``wandb sync``. The run's
options are recorded as the W&B ``config`` (merged under any ``config`` the user passes), and
the run is always finished — with exit code 1 if training failed — so an offline run file is
complete even when a step raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from tx_cli.loaders.base import TrainInputError

TRACKERS = ("wandb",)
Log = Callable[[dict[str, float], int], None]


@contextmanager
def open_tracker(
    name: str | None, args: dict[str, Any], config: dict[str, Any]
) -> Iterator[Log | None]:
    """Yield a logger for tracker ``name`` (None without one); finish the run on exit."""
    if name is None:
        yield None
        return
    if name not in TRACKERS:
        raise TrainInputError(f"--tracker: unknown tracker {name!r}; choose wandb")
    try:
        import wandb
    except ImportError as e:
        raise TrainInputError(
            "--tracker wandb: the wandb package is not installed (pip install 'tx-cli[wandb]')"
        ) from e
    user_config = args.get("config") or {}
    if not isinstance(user_config, dict):
        raise TrainInputError("--tracker-args: 'config' must be a JSON object")
    try:
        run = wandb.init(**{**args, "config": {**config, **user_config}})
    except TypeError as e:  # an argument wandb.init does not take
        raise TrainInputError(f"--tracker-args: {e}") from e
    except Exception as e:  # wandb raises its own types for bad settings, auth, network
        raise TrainInputError(f"--tracker wandb: {type(e).__name__}: {e}") from e
    failed = True
    try:
        yield lambda metrics, step: run.log(metrics, step=step)
        failed = False
    finally:
        run.finish(exit_code=1 if failed else 0)
