"""Fill ``.whl/`` with the wheels a GPU device machine needs to run tx from this checkout.

    python3 scripts/device/fetch_wheels.py          # here (it needs PyPI and pip), once
    # then, on the device: bash scripts/device/run.sh PLAN...   (with `.whl` carried)

Why: the device machines lent to this project (``/work/.library/device``) cannot reach PyPI,
and their image already holds JAX with CUDA, flax, optax, transformers, numpy and friends, but
not the server's stack (pydantic, FastAPI, SQLAlchemy, Alembic, uvicorn) nor the official
``tinker`` SDK. The runtime closure of the workspace and of ``tinker`` is read from ``uv.lock``
(markers evaluated for CPython 3.12 on x86-64 Linux, the device's Python); the packages the
image provides (:data:`DEVICE_PROVIDED`) are left out, except those in :data:`ALWAYS_CARRIED`,
whose versions matter to us. Earlier sessions assembled this list by hand in their device time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
from pathlib import Path

try:
    from packaging.markers import Marker
    from packaging.utils import canonicalize_name
except ImportError:  # a Python with pip but not packaging: pip vendors it
    from pip._vendor.packaging.markers import Marker  # type: ignore[no-redef]
    from pip._vendor.packaging.utils import canonicalize_name  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[2]
ROOTS = ["tx-types", "tx-engine", "tx-server", "tx-client", "tinker", "pytest-timeout"]
"""What runs there: the packages (not tx-cli: no benchmark needs typer or datasets), the SDK
that the end-to-end benchmark drives, and the pytest plugin the suite's config names."""

# Installed in the device image 'cuda' (/work/.library/device/KINDS.md, read 2026-11-17).
# fmt: off
DEVICE_PROVIDED = {
    "absl-py", "accelerate", "aiofiles", "anyio", "attrs", "certifi", "charset-normalizer",
    "chex", "click", "cloudpickle", "einops", "etils", "filelock", "flax", "fsspec", "h11",
    "hf-xet", "httpcore", "httpx", "huggingface-hub", "humanize", "hypothesis", "idna",
    "iniconfig", "jax", "jax-cuda13-pjrt", "jax-cuda13-plugin", "jaxlib", "jinja2",
    "markdown-it-py", "markupsafe", "mdurl", "ml-dtypes", "msgpack", "numpy", "opt-einsum",
    "optax", "orbax-checkpoint", "packaging", "pandas", "pluggy", "protobuf", "psutil", "pyarrow",
    "pygments", "pytest", "python-dateutil", "pyyaml", "regex", "requests", "rich", "safetensors",
    "scipy", "six", "sortedcontainers", "tensorstore", "tokenizers", "tqdm", "transformers",
    "treescope", "typer", "typing-extensions", "tzdata", "urllib3", "uvloop", "xxhash", "zipp",
}
# fmt: on

NOT_NEEDED = {"psycopg", "psycopg-binary"}
"""The PostgreSQL driver: benchmarks there use SQLite."""

ALWAYS_CARRIED = {"protobuf", "typing-extensions"}
"""Carried although the image has them: the generated ``*_pb2.py`` checks the protobuf runtime
version at import, and pydantic needs a recent typing-extensions."""

ENVIRONMENT = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "os_name": "posix",
}
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_28_x86_64"]


def _applies(dep: dict[str, object]) -> bool:
    """Whether a locked dependency edge holds on the device (its marker, if any, is true)."""
    marker = dep.get("marker")
    return marker is None or Marker(str(marker)).evaluate({**ENVIRONMENT, "extra": ""})


def closure(lock: dict[str, object]) -> dict[str, str]:
    """``{name: version}`` of every package the roots need at run time on the device."""
    packages: dict[tuple[str, str], dict[str, object]] = {}
    by_name: dict[str, list[dict[str, object]]] = {}
    for package in lock["package"]:  # type: ignore[union-attr]
        packages[(package["name"], package["version"])] = package
        by_name.setdefault(package["name"], []).append(package)

    def pick(dep: dict[str, object]) -> dict[str, object]:
        candidates = by_name[str(dep["name"])]
        if "version" in dep:
            return packages[(str(dep["name"]), str(dep["version"]))]
        assert len(candidates) == 1, dep
        return candidates[0]

    seen: set[tuple[str, tuple[str, ...]]] = set()
    result: dict[str, str] = {}
    todo = [(by_name[name][0], ()) for name in ROOTS]
    while todo:
        package, extras = todo.pop()
        if (str(package["name"]), extras) in seen:
            continue
        seen.add((str(package["name"]), extras))
        result[str(package["name"])] = str(package["version"])
        deps = list(package.get("dependencies", []))  # type: ignore[call-overload]
        optional = package.get("optional-dependencies", {})
        for extra in extras:  # e.g. httpx[http2]: its extra's edges too
            deps += optional.get(extra, [])  # type: ignore[union-attr]
        todo += [(pick(dep), tuple(sorted(dep.get("extra", [])))) for dep in deps if _applies(dep)]
    return result


def carried(needed: dict[str, str]) -> list[tuple[str, str]]:
    """``(name, version)`` of the wheels to carry: what the device image lacks or must be ours."""
    return sorted(
        (name, version)
        for name, version in needed.items()
        if not name.startswith("tx-")
        and name not in NOT_NEEDED
        and (canonicalize_name(name) not in DEVICE_PROVIDED or name in ALWAYS_CARRIED)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=ROOT / ".whl")
    args = parser.parse_args()
    carried_wheels = carried(closure(tomllib.loads((ROOT / "uv.lock").read_text())))
    args.dest.mkdir(exist_ok=True)
    platforms = [f"--platform={p}" for p in PLATFORMS]
    for name, version in carried_wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--only-binary=:all:", "--python-version=3.12", "--implementation=cp",
             *platforms, "-d", str(args.dest), f"{name}=={version}"],
            check=True,
        )  # fmt: skip
    size = sum(f.stat().st_size for f in args.dest.glob("*.whl")) / 2**20
    print(f"{len(carried_wheels)} wheels in {args.dest} ({size:.1f} MiB):")
    print(" ".join(f"{n}=={v}" for n, v in carried_wheels))


if __name__ == "__main__":
    main()
