"""The GPU device kit (`scripts/device/`): the wheel list it derives from `uv.lock`.

Downloading needs PyPI, so only the closure is checked here: it must hold everything the
server, its worker and the official SDK import on the device, and leave out what the device
image provides (JAX and friends), so that the carried tree stays far under its 64 MiB limit.
"""

from __future__ import annotations

import importlib.util
import subprocess
import tomllib
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def _kit() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "fetch_wheels", ROOT / "scripts" / "device" / "fetch_wheels.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_closure_holds_the_server_stack_and_the_sdk_at_locked_versions() -> None:
    kit = _kit()
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    needed = kit.closure(lock)
    for name in ("fastapi", "uvicorn", "sqlalchemy", "alembic", "pydantic", "pydantic-core",
                 "pydantic-settings", "tinker", "zstandard", "protobuf", "jax", "flax"):  # fmt: skip
        assert name in needed, name
    locked = {(p["name"], p["version"]) for p in lock["package"]}
    assert all((name, version) in locked for name, version in needed.items())
    # markers are evaluated for the device's CPython 3.12: one numpy, the 3.12 one
    numpy = {p["version"] for p in lock["package"] if p["name"] == "numpy"}
    assert needed["numpy"] in numpy
    assert needed["numpy"] == max(numpy, key=lambda v: tuple(int(x) for x in v.split(".")))
    assert not {"torch", "nox", "ruff"} & set(needed)


def test_carried_wheels_leave_the_device_image_alone() -> None:
    kit = _kit()
    carried = kit.carried(kit.closure(tomllib.loads((ROOT / "uv.lock").read_text())))
    names = {name for name, _ in carried}
    assert {"fastapi", "sqlalchemy", "pydantic", "tinker", "protobuf"} <= names
    assert not names & {"jax", "jaxlib", "flax", "optax", "numpy", "transformers"}
    assert not any(name.startswith("tx-") for name in names)


def test_device_runner_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "device" / "run.sh")], check=True)
