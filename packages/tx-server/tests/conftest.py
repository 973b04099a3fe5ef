"""Fixtures: a real uvicorn server on 127.0.0.1 over a real SQLite file in tmp_path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tx_server.testing import RunningServer, make_settings, run_server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    """A server in open-key mode with a short (5 s) long-poll."""
    with run_server(make_settings(tmp_path)) as running:
        yield running
