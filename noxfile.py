"""The single command surface of the tx workspace: CI calls nox and nothing else.

Every session installs the locked workspace (`uv sync --locked`) into its own virtualenv, so
what is tested is exactly what `uv.lock` pins. The one exception is `parity`: it needs torch,
which uv would resolve to a multi-GB CUDA build, so it uses pip (which takes the local CPU wheel)
in a plain venv; so does `cookbook`, for torch and for the cookbook's own transformers pin.
"""

from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path

import nox

nox.options.default_venv_backend = "uv"
nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.error_on_missing_interpreters = True

ROOT = Path(__file__).parent
PACKAGES = ["tx-types", "tx-engine", "tx-server", "tx-client", "tx-cli"]
DEFAULT_MARKERS = "not slow and not parity and not gpu and not cookbook"


def _sync(session: nox.Session) -> None:
    """Install the locked workspace (all packages + dev group) into the session's venv."""
    session.run_install(
        "uv",
        "sync",
        "--locked",
        "--all-packages",
        "--group",
        "dev",
        env={"UV_PROJECT_ENVIRONMENT": session.virtualenv.location},
        external=True,
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check + ruff format --check over the whole tree."""
    _sync(session)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy over every package (strict for types/client/server/cli, see pyproject)."""
    _sync(session)
    session.run("mypy", *sorted(glob.glob("packages/*/src")))


@nox.session
def tests(session: nox.Session) -> None:
    """The default CPU suite: everything not marked slow, parity or gpu."""
    _sync(session)
    # the slowest tests in every CI log: the suite must stay under 30 minutes on 2 cores
    session.run("pytest", "-m", DEFAULT_MARKERS, "--durations=25", *session.posargs)


@nox.session
def slow(session: nox.Session) -> None:
    """Long-running tests (multi-device sharding, long sequences, end-to-end soaks)."""
    _sync(session)
    session.run("pytest", "-m", "slow", *session.posargs)


@nox.session
def gpu(session: nox.Session) -> None:
    """Tests that need an accelerator (run on a lent GPU machine)."""
    _sync(session)
    session.run("pytest", "-m", "gpu", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Run every benchmark under benchmarks/ and print its table."""
    _sync(session)
    for script in sorted(glob.glob("benchmarks/*.py")):
        session.run("python", script, *session.posargs)


@nox.session(venv_backend="venv")
def parity(session: nox.Session) -> None:
    """Live reference checks against transformers + torch (+ peft), recomputing the goldens.

    pip, not uv: `torch==2.13.0` must come from the local CPU wheel.
    """
    session.install("torch==2.13.0", "peft", "pytest", "pytest-timeout", "hypothesis")
    session.install(*(f"-e./packages/{name}" for name in PACKAGES if name != "tx-server"))
    # Only the engine's tests: the others import tx-server or the SDK, not installed here.
    session.run("pytest", "-m", "parity", *(session.posargs or ["packages/tx-engine/tests"]))


# the newest whose dependencies the package index serves; math-rl: rl_basic, rl_loop, math_rl
COOKBOOK = "tinker-cookbook[math-rl]==0.5.8"
NUMERICS = ("jax", "jaxlib", "flax", "optax")


@nox.session(venv_backend="venv")
def cookbook(session: nox.Session) -> None:
    """tinker-cookbook recipes, unmodified, against a live server (`-m cookbook`).

    pip in a plain venv: the cookbook needs torch (local CPU wheel) and pins transformers
    below the workspace's lock. The engine's numerics stack stays at the locked versions.
    """
    locked = session.run(
        *("uv", "export", "--frozen", "--no-hashes", "--all-packages", "--no-emit-workspace"),
        silent=True,
        external=True,
    )
    assert isinstance(locked, str)
    pins = [line for line in locked.splitlines() if line.split("==")[0] in NUMERICS]
    constraints = Path(session.create_tmp()) / "numerics.txt"
    constraints.write_text("\n".join(pins) + "\n")
    session.install("-c", str(constraints), "torch==2.13.0", "tinker==0.38.0", COOKBOOK)
    session.install(
        "-c", str(constraints), "pytest", "pytest-timeout", "hypothesis",
        *(f"-e./packages/{name}" for name in PACKAGES),
    )  # fmt: skip
    session.run("pytest", "-m", "cookbook", *session.posargs)


@nox.session(venv_backend="none")
def build(session: nox.Session) -> None:
    """Build all five wheels, then install each alone in a fresh venv and import it.

    Siblings resolve from the freshly built wheels (`--find-links`), everything else from the
    index. `tx-types` and `tx-client` must not drag in an ML framework.
    """
    dist = ROOT / "dist"
    session.run("uv", "build", "--all-packages", "--wheel", "-o", str(dist), "--clear")
    for name in PACKAGES:
        wheel = _newest(dist, name)
        with tempfile.TemporaryDirectory(prefix=f"{name}-") as tmp:
            venv = Path(tmp) / "venv"
            py = venv / "bin" / "python"
            session.run("uv", "venv", "-q", str(venv))
            # --refresh-package: uv caches a find-links wheel by name and version, so without it
            # a rebuilt 0.1.0 wheel would be shadowed by an older build of the same version.
            refresh = [arg for pkg in PACKAGES for arg in ("--refresh-package", pkg)]
            session.run(
                *("uv", "pip", "install", "-q", "--python", str(py)),
                *("--find-links", str(dist), *refresh, wheel),
            )
            module = name.replace("-", "_")
            check = (
                f"import sys, {module}; "
                "heavy = sorted({'jax', 'torch', 'transformers'} & set(sys.modules)); "
                f"light = {name in ('tx-types', 'tx-client')!r}; "
                "assert not (light and heavy), heavy; "
                f"print({module}.__name__, {module}.__version__, 'ok')"
            )
            session.run(str(py), "-c", check, env={"PYTHONPATH": ""})
            if name in ("tx-types", "tx-client"):
                session.run(
                    str(py),
                    "-c",
                    "import importlib.util as u; "
                    "bad = [m for m in ('jax', 'torch', 'transformers') if u.find_spec(m)]; "
                    "assert not bad, f'installed alongside: {bad}'",
                )


def _newest(dist: Path, name: str) -> str:
    wheels = sorted(dist.glob(f"{name.replace('-', '_')}-*.whl"), key=os.path.getmtime)
    if not wheels:
        raise RuntimeError(f"no wheel for {name} in {dist}")
    return str(wheels[-1])
