"""The wire types, re-exported from ``tx_types`` (names as in ``tinker.types``).

``from tx_client import types`` replaces ``from tinker import types``.
"""

from tx_types import *  # noqa: F403
from tx_types import __all__ as __all__
