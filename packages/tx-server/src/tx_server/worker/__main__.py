"""``python -m tx_server.worker [--settings-json JSON]``: run the worker until SIGTERM/SIGINT.

Without ``--settings-json`` the settings come from ``TX_*`` variables, like the API's.
``serve()`` passes its own settings as JSON so that both processes agree on every knob.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading

from tx_engine.host_memory import reexec_with_tuned_malloc
from tx_server.settings import Settings


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments (``argv`` None: this program's), install signal handlers, run the
    loop. As a program it first re-executes with host-memory tuning (the engine runs here: see
    :mod:`tx_engine.host_memory`)."""
    if argv is None:
        reexec_with_tuned_malloc()
    from tx_server.worker.loop import run_worker  # jax: 4 s to import, once, after the re-exec

    parser = argparse.ArgumentParser(prog="python -m tx_server.worker")
    parser.add_argument("--settings-json", default=None, help="Settings as a JSON object")
    parser.add_argument(
        "--parent-pid", type=int, default=None, help="Exit when this process is gone"
    )
    args = parser.parse_args(argv)
    settings = Settings(**json.loads(args.settings_json)) if args.settings_json else Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s worker %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if args.parent_pid is not None:
        threading.Thread(
            target=_watch_parent, args=(args.parent_pid, stop), daemon=True, name="parent-watch"
        ).start()
    run_worker(settings, stop)


def _watch_parent(parent_pid: int, stop: threading.Event) -> None:
    """Set ``stop`` once the parent is gone (we are re-parented), so no worker is orphaned."""
    while not stop.wait(1.0):
        if os.getppid() != parent_pid:
            logging.getLogger(__name__).warning("parent %d is gone; stopping", parent_pid)
            stop.set()


if __name__ == "__main__":
    main()
