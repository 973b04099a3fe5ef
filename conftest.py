"""Session-wide test environment and fixtures, for every package's tests.

Servers and workers that tests start as subprocesses (``tx serve``, ``python -m tx_server``,
``tx demo``) read ``TX_COMPILATION_CACHE_DIR``: point it at one throw-away directory, so they
share compiled programs with each other and never write into the user's data directory.

``open_service_client`` opens SDK ``ServiceClient`` s that are closed when the test ends. A
``ServiceClient`` that has a session sends a heartbeat every 10 s from a background thread until
it is closed; one left open outlives its test and its server, logs "heartbeat failed" every 10 s
for the rest of the run and costs CPU. Tests that make a client and do not close it in a
``with`` block (or a ``close()`` that always runs) should make it with this fixture::

    def test_x(server: RunningServer, open_service_client: Callable[..., Any]) -> None:
        sc = open_service_client(server.url, API_KEY)                 # tinker.ServiceClient
        tx = open_service_client(server.url, API_KEY, sdk=tx_client)  # tx_client.ServiceClient

List the server fixture BEFORE ``open_service_client`` in the test's arguments (or use a
module- or session-scoped server): pytest tears fixtures down in reverse order of setup, so the
clients are then closed while their server still answers and the session is finished cleanly.
Closing is bounded and quiet anyway, so a server that is already gone (one started inside the
test, or listed after the fixture) costs at most ``CLOSE_TIMEOUT_S`` and never fails the test.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import gc
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest

if "TX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="tx-tests-jax-cache-")
    os.environ["TX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

OpenServiceClient = Callable[..., Any]
"""``open_service_client(base_url, api_key, *, sdk=tinker, **kwargs) -> sdk.ServiceClient``
(tests annotate the fixture as ``Callable[..., Any]``: this root conftest is not importable)."""

CLOSE_TIMEOUT_S = 5.0
"""How long teardown waits for one client's ``close()``. Against a live server it takes well
under a second; against a stopped one both SDKs retry the ``finish`` POST (the official SDK for
up to 5 minutes), so the wait must be bounded."""


MAPS_BEFORE_RELEASE = 20_000
"""Memory maps of this process above which compiled programs are dropped after a module."""


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs() -> Iterator[None]:
    """Drop jax's compiled programs after a test module once the process holds many maps.

    XLA:CPU maps ~3 memory regions per compiled program and frees them only with the program.
    One pytest process compiles thousands (every module builds engines of its own shapes), and
    at the kernel's limit of 65530 maps per process (``vm.max_map_count``) the next compile
    aborts or segfaults: the full suite reached it in its last server modules. Clearing after
    every module instead costs ~3 min of recompiles; past ``MAPS_BEFORE_RELEASE`` it happens a
    few times a run. The module's engines and servers are gone by then (this fixture is torn
    down last); programs a later module needs again are compiled again.
    """
    yield
    jax = sys.modules.get("jax")
    if jax is not None and _memory_maps() > MAPS_BEFORE_RELEASE:
        jax.clear_caches()
        gc.collect()


def _memory_maps() -> int:
    """Memory maps of this process (Linux); elsewhere a count that always releases."""
    try:
        with open("/proc/self/maps", "rb") as maps:
            return sum(1 for _ in maps)
    except OSError:
        return MAPS_BEFORE_RELEASE + 1


def _cancel(future: Any) -> None:
    """Cancel the ``concurrent.futures.Future`` behind an SDK future (``tinker``: method
    ``future()``; ``tx_client``: property ``future``). Both run ``close`` as a task on their
    background loop; cancelling it ends the ``finish`` retries, and both SDKs then still stop
    the heartbeat and release their connections (``finally`` blocks in their close paths)."""
    inner = getattr(future, "future", None)
    if callable(inner):
        inner = inner()
    if isinstance(inner, concurrent.futures.Future):
        inner.cancel()


def _close_quietly(client: Any) -> None:
    """Close ``client`` without failing or hanging the test's teardown.

    Errors are suppressed because they say nothing about the test: a server that is already
    stopped refuses the connection, a session the test already finished is a no-op or a 410, and
    the official SDK raises ``RuntimeError`` when the test already closed its ``holder``.
    """
    try:
        future = client.close("success")
    except Exception:
        return
    try:
        future.result(timeout=CLOSE_TIMEOUT_S)
    except concurrent.futures.TimeoutError:
        with contextlib.suppress(Exception):
            _cancel(future)
    except Exception:
        pass


@pytest.fixture
def open_service_client() -> Iterator[OpenServiceClient]:
    """A factory of SDK ``ServiceClient`` s, each closed (most recent first) at teardown."""
    opened: list[Any] = []

    def open_client(
        base_url: str, api_key: str, *, sdk: ModuleType | None = None, **kwargs: Any
    ) -> Any:
        if sdk is None:
            import tinker  # lazily: collecting tests must work where tinker is not installed

            sdk = tinker
        client = sdk.ServiceClient(base_url=base_url, api_key=api_key, **kwargs)
        opened.append(client)
        return client

    yield open_client
    for client in reversed(opened):
        _close_quietly(client)
