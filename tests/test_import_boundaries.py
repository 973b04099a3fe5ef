"""The package graph of conventions §2, enforced.

Each check imports a package and *all* of its submodules in a fresh interpreter and inspects
`sys.modules`, so a stray top-level import anywhere in a package fails here, not in a user's
laptop install. The pyproject dependency lists are checked too, so the graph holds for pip users.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level modules it must never pull in (directly or transitively).
FORBIDDEN: dict[str, set[str]] = {
    "tx_types": {"jax", "flax", "torch", "transformers", "fastapi", "sqlalchemy", "httpx"}
    | {"tx_engine", "tx_server", "tx_client", "tx_cli"},
    "tx_engine": {"tx_types", "tx_server", "tx_client", "tx_cli", "fastapi", "sqlalchemy", "httpx"},
    "tx_client": {"jax", "flax", "torch", "transformers", "tx_engine", "tx_server", "fastapi"},
}

_PROBE = """
import importlib, json, pkgutil, sys
pkg = importlib.import_module({name!r})
for info in pkgutil.walk_packages(pkg.__path__, prefix=pkg.__name__ + "."):
    importlib.import_module(info.name)
print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}})))
"""


def _imported_top_levels(name: str) -> set[str]:
    code = _PROBE.format(name=name)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_respect_graph(package: str) -> None:
    leaked = _imported_top_levels(package) & FORBIDDEN[package]
    assert not leaked, f"{package} (with all submodules) imports forbidden modules: {leaked}"


def _declared_deps(package_dir: str) -> set[str]:
    data = tomllib.loads((ROOT / "packages" / package_dir / "pyproject.toml").read_text())
    names = set()
    for req in data["project"]["dependencies"]:
        name = req.split(";")[0]
        for sep in "<>=!~[ ":
            name = name.split(sep)[0]
        names.add(name.strip().lower())
    return names


@pytest.mark.parametrize(
    ("package_dir", "forbidden"),
    [
        ("tx-types", {"jax", "flax", "torch", "transformers", "httpx", "fastapi", "tx-engine"}),
        ("tx-engine", {"tx-types", "tx-server", "tx-client", "fastapi", "sqlalchemy", "httpx"}),
        ("tx-client", {"jax", "flax", "torch", "transformers", "tx-engine", "tx-server"}),
        ("tx-cli", {"tx-server", "tx-client"}),  # extras only, imported lazily
    ],
)
def test_declared_dependencies_respect_graph(package_dir: str, forbidden: set[str]) -> None:
    assert not (_declared_deps(package_dir) & forbidden)
