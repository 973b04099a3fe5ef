"""tx-cli."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("tx-cli")
except PackageNotFoundError:  # a source checkout on PYTHONPATH (e.g. an accelerator box)
    __version__ = "0+source"
