"""tx-engine."""

from importlib.metadata import version as _version

__version__ = _version("tx-engine")
