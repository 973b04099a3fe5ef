"""Shared fixtures of the tx-types tests.

``wire_dump`` is the one serialisation the SDK uses for request bodies
(``model_dump(mode="json", exclude_none=True)``); the conformance tests compare exactly that.
``sdk_types`` is the official SDK's ``tinker.types`` plus the few wire types it defines but does
not re-export at package level (so examples can be built from either library by name).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import BaseModel


def _wire_dump(obj: BaseModel) -> dict[str, Any]:
    return obj.model_dump(mode="json", exclude_none=True)


@pytest.fixture
def wire_dump() -> Callable[[BaseModel], dict[str, Any]]:
    return _wire_dump


@pytest.fixture(scope="session")
def sdk_types() -> types.SimpleNamespace:
    tinker_types = pytest.importorskip("tinker.types")
    from tinker.types.generic_event import GenericEvent
    from tinker.types.try_again_response import TryAgainResponse

    public = {k: v for k, v in vars(tinker_types).items() if not k.startswith("_")}
    return types.SimpleNamespace(
        **public, GenericEvent=GenericEvent, TryAgainResponse=TryAgainResponse
    )
