"""Model state flattened once per sampling run, so a decode dispatch does not re-flatten it.

jit flattens an ``nnx.State`` argument in Python, one callback per variable: ~1 ms per
dispatch for the small preset's ~260 variables (measured on 2 CPU cores), against ~0.07 ms
for the same arrays as a flat tuple. A decode step is dispatched once per generated token, so
:class:`tx_engine.sampling.continuous.ContinuousRun` flattens ``lora`` / ``rest`` once per run
(:meth:`FlatState.of`) and the sampling programs rebuild the state inside the trace
(:func:`state_of`). The treedef rides as interned aux data: the jit cache compares it by ``is``.
"""

from __future__ import annotations

from typing import Any

import jax

State = Any  # an nnx.State (any pytree works)


class _TreeSpec:
    """A treedef as jit aux data: hashed once and interned, so a dispatch compares by ``is``."""

    __slots__ = ("_hash", "treedef")

    def __init__(self, treedef: Any) -> None:
        self.treedef, self._hash = treedef, hash(treedef)

    @classmethod
    def of(cls, treedef: Any) -> _TreeSpec:
        return _INTERNED.setdefault(treedef, cls(treedef))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _TreeSpec):
            return NotImplemented
        return self is other or bool(self.treedef == other.treedef)


@jax.tree_util.register_pytree_node_class
class FlatState:
    """An ``nnx.State`` flattened once; the sampling programs accept it for ``lora``/``rest``.

    Build it with :meth:`of` at the start of a run (the arrays are the state's own, not
    copies); inside a program :func:`state_of` turns it back into the state.
    """

    __slots__ = ("leaves", "spec")

    def __init__(self, leaves: tuple[Any, ...], spec: _TreeSpec) -> None:
        self.leaves, self.spec = leaves, spec

    @classmethod
    def of(cls, state: State) -> FlatState:
        leaves, treedef = jax.tree.flatten(state)
        return cls(tuple(leaves), _TreeSpec.of(treedef))

    def tree_flatten(self) -> tuple[tuple[Any, ...], _TreeSpec]:
        return self.leaves, self.spec

    @classmethod
    def tree_unflatten(cls, spec: _TreeSpec, leaves: Any) -> FlatState:
        return cls(tuple(leaves), spec)


def state_of(state: State | FlatState) -> State:
    """The ``nnx.State`` itself, rebuilt from a :class:`FlatState` if need be."""
    if isinstance(state, FlatState):
        return jax.tree.unflatten(state.spec.treedef, state.leaves)
    return state


_INTERNED: dict[Any, _TreeSpec] = {}
