"""Test helpers shipped with the package: run a real uvicorn server in a background thread.

Used by this package's tests and by any other package's end-to-end tests (tx-client, tx-cli):
the server listens on a free 127.0.0.1 port over a real database and is stopped on exit.
A tiny ASGI recorder in front of the app logs request paths, so tests can check the order in
which a client calls endpoints.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from tx_server.app import create_app
from tx_server.db.database import Database
from tx_server.settings import Settings
from tx_server.work_queue import WorkQueue

__all__ = [
    "API_KEY",
    "Recorder",
    "RunningServer",
    "make_settings",
    "offline_hub",
    "run_hub_model_server",
    "run_server",
    "wake_latencies",
]

API_KEY = "tml-tx-server-tests-key-0001"

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]


@dataclass
class Recorder:
    """ASGI wrapper that records ``METHOD path`` of every HTTP request."""

    app: ASGIApp
    calls: list[str] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.calls.append(f"{scope['method']} {scope['path']}")
        await self.app(scope, receive, send)


@dataclass
class RunningServer:
    """A live server: its base URL, settings and request log."""

    url: str
    settings: Settings
    recorder: Recorder

    def queue(self) -> WorkQueue:
        """A worker-side queue on its own engine (as a separate worker process would have)."""
        return WorkQueue(Database(self.settings.database_url))


def _bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def run_server(settings: Settings) -> Iterator[RunningServer]:
    """Start uvicorn in a thread on a pre-bound free port; stop it on exit."""
    recorder = Recorder(create_app(settings))
    sock = _bound_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        recorder, log_level="warning", lifespan="on", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", settings, recorder)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Test settings: SQLite file and checkpoints under ``tmp_path``, no keys by default, no
    compilation cache (jax's is process-wide: a test must not switch it on for the others)."""
    values: dict[str, Any] = {
        "database_url": f"sqlite:///{tmp_path / 'tx.db'}",
        "checkpoint_root": tmp_path / "checkpoints",
        "compilation_cache_dir": None,
        "base_models": ["Qwen/Qwen3-0.6B", "meta-llama/Llama-3.2-1B"],
        "long_poll_seconds": 5.0,
    }
    values.update(overrides)
    return Settings(**values)


def wake_latencies(
    server: RunningServer, submit: Callable[[int], str], samples: int = 5, delay: float = 0.3
) -> list[float]:
    """Seconds from a worker's ``complete`` returning to the waiting poll's answer, per sample.

    Each sample submits a request (``submit(i)`` returns its id), starts a ``retrieve_future``
    long-poll, and completes the request from another thread (its own engine, as a worker
    process would) after ``delay`` seconds.
    """
    import httpx

    queue = server.queue()
    latencies = []
    for i in range(samples):
        request_id = submit(i)
        done_at: list[float] = []

        def finish(rid: str = request_id, out: list[float] = done_at) -> None:
            time.sleep(delay)
            queue.complete(rid, b'{"metrics": {"i": 1.0}}', "application/json")
            out.append(time.perf_counter())

        thread = threading.Thread(target=finish)
        thread.start()
        response = httpx.post(
            f"{server.url}/api/v1/retrieve_future",
            json={"request_id": request_id},
            headers={"X-API-Key": API_KEY},
            timeout=60,
        )
        answered_at = time.perf_counter()
        thread.join()
        if response.json() != {"metrics": {"i": 1.0}}:
            raise AssertionError(f"unexpected answer {response.status_code} {response.text}")
        latencies.append(answered_at - done_at[0])
    queue.db.dispose()
    return latencies


@contextlib.contextmanager
def run_hub_model_server(root: Path, **overrides: Any) -> Iterator[RunningServer]:
    """API + in-process worker serving the kit's tiny models under hub names (e.g. Qwen/Qwen3-8B).

    The hub aliases are installed into ``root/hf`` and ``HF_HOME`` / ``HF_HUB_OFFLINE=1`` point
    there for the duration, so unmodified clients that look tokenizers up by name work offline.
    ``overrides`` go to :func:`make_settings` (e.g. ``base_models``, ``engine``). The worker
    (and with it jax) is imported only here, never by the API.
    """
    from tx_server.worker.loop import worker_thread

    settings = make_settings(root, **{"long_poll_seconds": 20.0, **overrides})
    with offline_hub(root / "hf"), run_server(settings) as server, worker_thread(settings):
        yield server


@contextlib.contextmanager
def offline_hub(hf_home: Path) -> Iterator[None]:
    """The kit's tiny models installed under hub names in ``hf_home``, and ``HF_HOME`` /
    ``HF_HUB_OFFLINE=1`` pointing there for the duration (restored on exit).

    huggingface_hub reads these variables once, at import: code that resolves hub names in
    this process must import it inside the block, or run in a subprocess started inside it.
    """
    import os

    from tx_engine.testing import install_hub_aliases

    install_hub_aliases(hf_home)
    saved = {k: os.environ.get(k) for k in ("HF_HOME", "HF_HUB_OFFLINE")}
    os.environ.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
