"""What every compiled program shares: the static graph wrapper, the trace counter, type names."""

from __future__ import annotations

from collections import Counter
from typing import Any

from flax import nnx

Batch = dict[str, Any]
State = nnx.State[Any, Any]
TRACE_COUNTS: Counter[str] = Counter()
"""Traces per program name: tests use it to prove that a new shape inside a bucket, or a new
hyperparameter value, compiles nothing."""


class StaticGraph:
    """A graphdef whose hash is computed once, to pass as a static argument of the programs.

    Every dispatch of a jitted function hashes its static arguments, and an nnx ``GraphDef``
    hashes its whole node tree each time: ~5 ms for the 2-layer tiny model on a CPU, most of
    the host time of a one-token request. The engine wraps each graphdef once and passes the
    same object, so the cache lookup is one stored hash and an ``is``. The programs accept a
    bare ``GraphDef`` too (:func:`graph_of`).
    """

    __slots__ = ("_hash", "graphdef")

    def __init__(self, graphdef: nnx.GraphDef[Any]) -> None:
        self.graphdef = graphdef
        self._hash = hash(graphdef)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StaticGraph):
            return NotImplemented
        return self.graphdef is other.graphdef or bool(self.graphdef == other.graphdef)


def graph_of(graphdef: nnx.GraphDef[Any] | StaticGraph) -> nnx.GraphDef[Any]:
    """The ``GraphDef`` itself, unwrapped from a :class:`StaticGraph` if need be."""
    return graphdef.graphdef if isinstance(graphdef, StaticGraph) else graphdef
