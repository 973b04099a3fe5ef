"""Settings from TX_* variables, and API keys → tenants."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from tx_server.auth import Keyring, tenant_of_key
from tx_server.errors import UnauthorizedError
from tx_server.settings import Settings, default_data_dir


def test_defaults_live_in_the_user_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TX_DATABASE_URL", "TX_CHECKPOINT_ROOT", "TX_API_KEYS"):
        monkeypatch.delenv(name, raising=False)
    s = Settings()
    assert s.database_url == f"sqlite:///{default_data_dir() / 'tx.db'}"
    assert s.checkpoint_root == default_data_dir() / "checkpoints"
    assert (s.host, s.long_poll_seconds, s.api_keys, s.base_models) == ("127.0.0.1", 25.0, [], [])


def test_environment_with_nested_engine_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TX_PORT", "9123")
    monkeypatch.setenv("TX_BASE_MODELS", '["Qwen/Qwen3-0.6B"]')
    monkeypatch.setenv("TX_API_KEYS", '["tml-a"]')
    monkeypatch.setenv("TX_ENGINE__MAX_LORA_RANK", "64")
    monkeypatch.setenv("TX_ENGINE__MESH_TP", "2")
    s = Settings()
    assert (s.port, s.base_models, s.engine.max_lora_rank) == (9123, ["Qwen/Qwen3-0.6B"], 64)
    assert [k.get_secret_value() for k in s.api_keys] == ["tml-a"]
    kwargs = s.engine.engine_config_kwargs()
    assert kwargs["mesh_tp"] == 2
    assert "max_seq_len" not in kwargs
    assert "tml-a" not in repr(s)  # keys are secrets


def test_compilation_cache_dir_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A path moves the cache; an empty value turns it off (it used to mean the current dir)."""
    monkeypatch.delenv("TX_COMPILATION_CACHE_DIR", raising=False)
    assert Settings().compilation_cache_dir == default_data_dir() / "jax-cache"
    monkeypatch.setenv("TX_COMPILATION_CACHE_DIR", "/tmp/tx-cache")
    assert Settings().compilation_cache_dir == Path("/tmp/tx-cache")
    monkeypatch.setenv("TX_COMPILATION_CACHE_DIR", "")
    assert Settings().compilation_cache_dir is None


def test_compilation_cache_dir_agrees_with_tx_train(monkeypatch: pytest.MonkeyPatch) -> None:
    """`tx serve` and `tx train` share one cache: the server's copy of the rule (its API process
    may not import tx_engine) reads every value as tx_engine.compile_cache does."""
    from tx_engine.compile_cache import cache_dir_from

    for value in (None, "", "  ", "/tmp/tx-cache"):
        if value is None:
            monkeypatch.delenv("TX_COMPILATION_CACHE_DIR", raising=False)
        else:
            monkeypatch.setenv("TX_COMPILATION_CACHE_DIR", value)
        assert Settings().compilation_cache_dir == cache_dir_from(value), repr(value)


def test_bad_values_name_the_field() -> None:
    with pytest.raises(ValidationError, match="database_url"):
        Settings(database_url="mysql://x")
    with pytest.raises(ValidationError, match="long_poll_seconds"):
        Settings(long_poll_seconds=60)


def test_open_mode_accepts_any_tml_key_as_its_own_tenant() -> None:
    ring = Keyring.from_settings(Settings())
    assert ring.open_mode
    assert ring.tenant_for("tml-alice") == tenant_of_key("tml-alice") != ring.tenant_for("tml-bob")
    for bad in (None, "", "sk-123", "tml-", "tml-a b", "eyJhbGciOi.x.y"):
        with pytest.raises(UnauthorizedError):
            ring.tenant_for(bad)


def test_configured_keys_and_keys_file(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# team keys\ntml-ann  research\ntml-bob research  # shared\ntml-cy\n")
    ring = Keyring.from_settings(Settings(api_keys=["tml-root"], api_keys_file=keys_file))
    assert ring.tenant_for("tml-ann") == ring.tenant_for("tml-bob") == "research"
    assert ring.tenant_for("tml-cy") == tenant_of_key("tml-cy")
    assert ring.tenant_for("tml-root") == tenant_of_key("tml-root")
    with pytest.raises(UnauthorizedError, match="unknown API key"):
        ring.tenant_for("tml-eve")
    keys_file.write_text("tml-ok tenant extra\n")
    with pytest.raises(ValueError, match=r"keys:1: expected 'KEY \[TENANT\]'"):
        Keyring.from_settings(Settings(api_keys_file=keys_file))
    # A file with no keys (empty or comments only) locked every client out with 401s.
    keys_file.write_text("# keys go here\n\n")
    with pytest.raises(ValueError, match="holds no API keys"):
        Keyring.from_settings(Settings(api_keys_file=keys_file))
    assert Keyring.from_settings(Settings(api_keys=["tml-root"], api_keys_file=keys_file))
