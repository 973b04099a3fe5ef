"""`tx demo` is the README's main job: it must run end to end and really memorise the reply."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from tx_cli.main import app


def test_demo_memorises_the_reply(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TX_HOME", str(tmp_path))  # build the tiny model from scratch
    result = CliRunner().invoke(app, ["demo"])
    assert result.exit_code == 0, result.output
    assert "reply memorised" in result.output
    assert "after:  'The secret word is jaxopolis.<|im_end|>'" in result.output
    assert (tmp_path / "tiny-models").is_dir()


def test_demo_fails_loudly_when_training_is_too_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TX_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["demo", "--steps", "1"])
    assert result.exit_code == 1, result.output
    assert "NOT memorised" in result.output
