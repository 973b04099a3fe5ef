"""Fixtures: a real uvicorn server on 127.0.0.1 over a real SQLite file in tmp_path, and SDK
clients of such servers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tx_server.testing import API_KEY, RunningServer, make_settings, run_server

if TYPE_CHECKING:
    import tinker


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    """A server in open-key mode with a short (5 s) long-poll."""
    with run_server(make_settings(tmp_path)) as running:
        yield running


@pytest.fixture
def sdk_service(
    open_service_client: Callable[..., Any],
) -> Callable[[RunningServer], tinker.ServiceClient]:
    """``sdk_service(server)``: an official-SDK client of ``server`` with the tests' API key,
    finished by ``open_service_client`` when the test ends if the test does not get to it.

    A function-scoped server goes before this fixture in a test's arguments, for the reason
    the root conftest gives for ``open_service_client``.
    """

    def service(server: RunningServer) -> tinker.ServiceClient:
        client: tinker.ServiceClient = open_service_client(server.url, API_KEY)
        return client

    return service
