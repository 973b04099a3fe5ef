"""Keep a worker process running next to the API (used by :func:`tx_server.serve.serve`).

Why a separate process: a crash or OOM in the engine (jax) must not take the API down; pollers
keep their long-polls; the restarted worker fails what was left ``running`` (category ``server``)
and restores live training runs on demand (:mod:`tx_server.worker.recovery`). Restarts back
off (1 s doubling to 30 s) so a worker that dies at start-up does not spin.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading

from tx_server.settings import Settings

__all__ = ["WorkerSupervisor", "worker_command"]

log = logging.getLogger(__name__)


def worker_command(settings: Settings) -> list[str]:
    """The command line of a worker process with exactly these settings (keys left out)."""
    values = settings.model_dump(mode="json", exclude={"api_keys", "api_keys_file"})
    return [
        sys.executable,
        "-m",
        "tx_server.worker",
        "--settings-json",
        json.dumps(values),
        "--parent-pid",
        str(os.getpid()),
    ]


class WorkerSupervisor:
    """Start the worker process, restart it when it exits, stop it on :meth:`stop`."""

    def __init__(self, settings: Settings) -> None:
        self.command = worker_command(settings)
        self._stop = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._supervise, name="tx-worker-supervisor")
        self.starts = 0

    def start(self) -> None:
        self._thread.start()

    def _supervise(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            self._proc = subprocess.Popen(self.command)
            self.starts += 1
            code = self._proc.wait()
            if self._stop.is_set():
                return
            log.error("worker exited with code %s; restarting in %.0f s", code, backoff)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 30.0)

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate the worker (SIGTERM, then SIGKILL after ``timeout``) and stop restarting."""
        self._stop.set()
        proc = self._proc
        self._proc = None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)
