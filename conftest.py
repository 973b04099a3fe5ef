"""Session-wide test environment, for every package's tests.

Servers and workers that tests start as subprocesses (``tx serve``, ``python -m tx_server``,
``tx demo``) read ``TX_COMPILATION_CACHE_DIR``: point it at one throw-away directory, so they
share compiled programs with each other and never write into the user's data directory.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

if "TX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="tx-tests-jax-cache-")
    os.environ["TX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
