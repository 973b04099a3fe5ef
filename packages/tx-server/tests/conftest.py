"""Fixtures: a real uvicorn server on 127.0.0.1 over a real SQLite file in tmp_path, SDK
clients of such servers, and a throw-away PostgreSQL server (``pg_url``)."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tx_server.testing import (
    API_KEY,
    RunningServer,
    make_settings,
    run_hub_model_server,
    run_server,
)

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


def _postgres_bin_dir() -> Path | None:
    found = shutil.which("initdb")
    if found is not None:
        return Path(found).resolve().parent
    installed = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(installed[-1]).parent if installed else None


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL cluster (initdb into a temp dir, unix socket only, trust auth, run as
    the ``postgres`` user when the tests run as root); its URL. Skipped without the binaries."""
    bin_dir = _postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found")
    as_root = os.geteuid() == 0
    if as_root:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")

    def run(*cmd: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
        subprocess.run([*prefix, *cmd], check=True, capture_output=True)

    base = Path(tempfile.mkdtemp(prefix="tx-pg-"))
    if as_root:
        os.chown(base, user.pw_uid, user.pw_gid)
    data, pg_ctl = base / "data", str(bin_dir / "pg_ctl")
    run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync")
    options = f"-p 5432 -k {base} -c listen_addresses='' -c fsync=off"
    run(pg_ctl, "-D", str(data), "-o", options, "-w", "-l", str(base / "log"), "start")
    try:
        yield f"postgresql+psycopg://postgres@/postgres?host={base}&port=5432"
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            run(pg_ctl, "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(base, ignore_errors=True)


COOKBOOK_MODEL = "Qwen/Qwen3-8B"
"""What the cookbook tests serve the kit's tiny model as: the cookbook then picks its ``qwen3``
renderer and finds the tokenizer by name, offline."""
COOKBOOK_RECIPE_SECONDS = 900


@pytest.fixture(scope="session")
def cookbook_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One API + worker for every cookbook test (``nox -s cookbook``), serving
    :data:`COOKBOOK_MODEL` with room for the recipes' ranks and sequence lengths."""
    from tx_server.settings import EngineSettings

    engine = EngineSettings(max_lora_rank=32, max_lora_adapters=4, max_seq_len=1024)
    root = tmp_path_factory.mktemp("cookbook")
    with run_hub_model_server(root, base_models=[COOKBOOK_MODEL], engine=engine) as server:
        yield server


@pytest.fixture
def run_cookbook(cookbook_server: RunningServer) -> Callable[..., None]:
    """``run_cookbook(*args, datasets_cache=None)``: ``python <args>`` in a subprocess, told
    where tx is only by ``TINKER_BASE_URL`` / ``TINKER_API_KEY``, as a user would; the test
    fails with the output's tail if it exits non-zero.

    ``run_hub_model_server`` has pointed ``HF_HOME`` at the tiny model's hub aliases (offline)
    and the subprocess inherits that. With ``datasets_cache``, hub datasets are read offline
    from there (``HF_DATASETS_CACHE``, ``HF_DATASETS_OFFLINE=1``).
    """

    def run(*args: str, datasets_cache: Path | None = None) -> None:
        env = {**os.environ, "TINKER_BASE_URL": cookbook_server.url, "TINKER_API_KEY": API_KEY}
        if datasets_cache is not None:
            env.update(HF_DATASETS_CACHE=str(datasets_cache), HF_DATASETS_OFFLINE="1")
        done = subprocess.run(
            [sys.executable, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=COOKBOOK_RECIPE_SECONDS,
        )
        if done.returncode != 0:
            pytest.fail(
                f"{' '.join(args)} exited {done.returncode}:\n"
                f"{done.stdout[-4000:]}{done.stderr[-8000:]}"
            )

    return run
