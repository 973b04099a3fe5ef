"""Model state that crosses the ``jax.jit`` boundary as a flat tuple of arrays.

Why: jit flattens an ``nnx.State`` argument in Python, one callback per variable, compares its
treedef (every variable's metadata) for the cache lookup, and builds one ``Variable`` per leaf
of a returned state. A program that takes and returns the small preset's 114 LoRA factors
four times over paid ~6.7 ms per dispatch for it, against ~1 ms with the same arrays as a
:class:`FlatState` (2 CPU cores); an optimizer step (two such programs) spent 12 ms of host
time before, 6 ms after. So:

* the training programs are :class:`FlatProgram` s (:func:`flat_jit`): callers may pass and
  get ``nnx.State`` as ever, or call :meth:`FlatProgram.flat` to keep the results flat;
* the engine holds its trees as :class:`Held` (flat side and state side, each built from the
  other on demand): its per-request calls read and replace only the flat side, and a state is
  rebuilt only when slot bookkeeping or a checkpoint asks for it;
* a sampling run takes ``lora`` / ``rest`` flat from the engine and passes the same objects to
  every decode dispatch; the sampling programs rebuild the state inside the trace
  (:func:`state_of`).

The treedef rides as interned aux data: the jit cache compares it by ``is``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import jax
from flax import nnx

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
    """An ``nnx.State`` flattened once, to pass to (and get from) the programs.

    :meth:`of` keeps the state's own arrays, not copies; :func:`state_of` turns it back into
    the state, inside a program or outside.
    """

    __slots__ = ("__weakref__", "leaves", "spec")  # weakref: keyed by tx_engine.step.ahead

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


def flatten_states(value: Any) -> Any:
    """``value`` with every ``nnx.State`` in it (see :func:`_convert`) as a :class:`FlatState`."""
    return _convert(value, lambda s: FlatState.of(s) if isinstance(s, nnx.State) else s)


def unflatten_states(value: Any) -> Any:
    """``value`` with every :class:`FlatState` in it rebuilt as its ``nnx.State``."""
    return _convert(value, state_of)


def _convert(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """``leaf`` applied to every state in ``value``, looking through tuples (named ones too)
    and dataclasses (``OptState``); anything without a state inside is returned as it is."""
    if isinstance(value, nnx.State | FlatState):
        return leaf(value)
    if isinstance(value, tuple):
        items = [_convert(v, leaf) for v in value]
        if all(new is old for new, old in zip(items, value, strict=True)):
            return value
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        changes = {k: new for k, v in fields.items() if (new := _convert(v, leaf)) is not v}
        return dataclasses.replace(value, **changes) if changes else value
    return value


class FlatProgram:
    """A jitted program whose ``nnx.State`` arguments and results cross the boundary flat.

    Written for, and called with, ``nnx.State`` (also inside tuples and ``OptState``): around
    the compiled call the non-static arguments become :class:`FlatState`, and calling the
    program returns states again (:func:`state_of`: one ``Variable`` per leaf, ~0.2 ms for 114
    leaves). :meth:`flat` returns the results flat instead, for a caller that keeps them flat
    (the engine, :class:`Held`): then no dispatch builds or inspects a ``Variable``.
    """

    def __init__(self, fun: Callable[..., Any], static: frozenset[str], jit_kwargs: Any) -> None:
        self._signature = inspect.signature(fun)
        self._static = static

        @functools.wraps(fun)
        def traced(*args: Any, **kwargs: Any) -> Any:
            args, kwargs = self._arguments(args, kwargs, unflatten_states)
            return flatten_states(fun(*args, **kwargs))

        self._compiled = jax.jit(traced, static_argnames=tuple(static), **jit_kwargs)
        functools.update_wrapper(self, fun)

    def _arguments(
        self, args: Any, kwargs: Any, convert: Callable[[Any], Any]
    ) -> tuple[Any, dict[str, Any]]:
        bound = self._signature.bind(*args, **kwargs)
        for name, value in bound.arguments.items():
            if name not in self._static:
                bound.arguments[name] = convert(value)
        return bound.args, bound.kwargs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return unflatten_states(self.flat(*args, **kwargs))

    def flat(self, *args: Any, **kwargs: Any) -> Any:
        """The results with their states as :class:`FlatState` (arguments may be either)."""
        args, kwargs = self._arguments(args, kwargs, flatten_states)
        return self._compiled(*args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        """``jax.jit``'s ``lower`` (for inspecting the compiled program)."""
        args, kwargs = self._arguments(args, kwargs, flatten_states)
        return self._compiled.lower(*args, **kwargs)


def flat_jit(
    *, static_argnames: Iterable[str] = (), **jit_kwargs: Any
) -> Callable[[Callable[..., Any]], FlatProgram]:
    """Decorator: ``jax.jit`` with ``static_argnames`` and ``jit_kwargs``, as a
    :class:`FlatProgram`. Static arguments are passed through untouched."""
    static = frozenset(static_argnames)
    return lambda fun: FlatProgram(fun, static, jit_kwargs)


class Held:
    """A tree of states the engine holds: flat for dispatch, as ``nnx.State`` on demand.

    Either side is built from the other the first time it is asked for, then kept; a new
    value is a new :class:`Held`, so neither side can go stale as long as nobody changes a
    held state's variables in place without assigning the result (the engine's slot
    bookkeeping writes new arrays and assigns a new :class:`Held`).
    """

    __slots__ = ("_flat", "_tree")

    def __init__(self, tree: Any = None, *, flat: Any = None) -> None:
        self._tree, self._flat = tree, flat

    @property
    def flat(self) -> Any:
        if self._flat is None:
            self._flat = flatten_states(self._tree)
        return self._flat

    @property
    def tree(self) -> Any:
        if self._tree is None:
            self._tree = unflatten_states(self._flat)
        return self._tree


class HeldAttribute:
    """An attribute read and assigned as a state tree but stored as a :class:`Held` (in
    ``_held_<name>``), so hot paths can read and assign the flat side instead."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = f"_held{name}" if name.startswith("_") else f"_held_{name}"

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        return getattr(obj, self.key).tree

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(obj, self.key, value if isinstance(value, Held) else Held(value))
