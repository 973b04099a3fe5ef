"""Server-side custom losses (flag ``custom_loss_server_side``, off by default).

The SDK traces the user's loss with torch.fx and uploads the graph as plain data; nothing in it
is executable until the server rebuilds it from an allow-list of operations (spec §7 B).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ._base import WireModel

__all__ = [
    "CreateCustomLossRequest",
    "CreateCustomLossResponse",
    "CustomLossGraph",
    "CustomLossInput",
    "CustomLossInputRank",
    "CustomLossNode",
    "CustomLossNodeOp",
]

CustomLossNodeOp = Literal[
    "placeholder", "get_attr", "call_function", "call_method", "call_module", "output"
]
CustomLossInputRank = Literal[0, 1, 2]
"""0 is a scalar, 1 is ``[T]`` and 2 is ``[T, K]``."""


class CustomLossNode(WireModel):
    """One fx node; arguments use the one-key-object encoding of spec §4.1."""

    op: CustomLossNodeOp
    name: str
    target: str
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)


class CustomLossGraph(WireModel):
    format: Literal[1] = 1
    nodes: list[CustomLossNode]


class CustomLossInput(WireModel):
    """``logprobs`` or a ``loss_fn_inputs`` key, with the rank of every datum's value."""

    name: str
    rank: CustomLossInputRank


class CreateCustomLossRequest(WireModel):
    session_id: str
    custom_loss_seq_id: int
    name: str
    inputs: list[CustomLossInput]
    graph: CustomLossGraph
    type: Literal["create_custom_loss"] = "create_custom_loss"


class CreateCustomLossResponse(WireModel):
    loss_id: str
    type: Literal["create_custom_loss"] = "create_custom_loss"
