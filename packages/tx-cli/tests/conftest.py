"""Fixtures shared by the tx-cli tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tx_engine.testing import build_model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The kit's tiny Qwen3 as a local model directory, built once for every CLI test."""
    return build_model("tiny-qwen3", tmp_path_factory.mktemp("m"))
