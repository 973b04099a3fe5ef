"""Where the compilation cache lives: the one reading of the setting `tx serve` and `tx train`
share, and a module that chooses it without importing jax (the API process must not)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tx_engine.compile_cache import cache_dir_from, default_cache_dir


def test_the_default_is_jax_cache_in_the_user_data_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_cache_dir() == tmp_path / "data" / "tx" / "jax-cache"


def test_unset_means_default_blank_means_off_else_the_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir_from(None) == tmp_path / "data" / "tx" / "jax-cache"
    assert cache_dir_from("") is None
    assert cache_dir_from("  \t") is None  # not Path("  \t"), a directory under the cwd
    assert cache_dir_from(str(tmp_path / "c")) == tmp_path / "c"
    assert cache_dir_from("~/c") == tmp_path / "home" / "c"


def test_choosing_a_directory_does_not_import_jax() -> None:
    code = (
        "import sys; from tx_engine.compile_cache import cache_dir_from; "
        "cache_dir_from(None); print('jax' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
