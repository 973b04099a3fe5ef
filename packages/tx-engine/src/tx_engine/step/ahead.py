"""Programs compiled ahead of their first call, on a background thread, then called directly.

Why: ``jax.jit`` compiles a new shape at its first call, on the calling thread. In a sampling
run that thread is the decode loop, so a prompt in a new length bucket, or an admission of a
new size, stalls every row that is decoding: ~0.6 s per admission program on the tiny preset
(2 CPU cores), 2.2 s for a decode step of the small one, tens of seconds for a large model on
a GPU. Compiling on another thread lets the live rows keep decoding meanwhile. But jit's own
cache cannot be filled from outside: ``f.lower(...).compile()`` on another thread shares the
trace with a later ``f(...)``, not the executable (measured: that first call still took
0.41 s, against 0.74 s cold and 0.006 s warm). So the programs a run wants ahead of time are
kept here as ``Compiled`` objects and called directly, which costs what a jit dispatch costs
(5.6 µs measured on both).

A :class:`ProgramTable` keys a program like jit does: the function, its static arguments,
the arguments' tree structure and each leaf's shape, dtype, weak type and, for a committed
array, sharding. The model's :class:`FlatState` trees (hundreds of leaves, the same objects
for many dispatches) are keyed once per object. Every program is compiled once per key,
whether ahead (:meth:`ProgramTable.ready`) or at its first :meth:`~ProgramTable.call`.

Calls pass every argument by keyword, statics apart, so that the ``Compiled`` object (which
takes the dynamic arguments only, in the tree they were lowered with) is called exactly as it
was lowered.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import numpy as np

from tx_engine.step.flat_state import FlatState

__all__ = ["PROGRAMS", "ProgramTable", "spec_like"]


def _is_state(x: Any) -> bool:
    return isinstance(x, FlatState)


def _leaf_key(x: Any) -> Hashable:
    """What jit's cache distinguishes about one argument leaf."""
    if isinstance(x, jax.Array):  # as spec_like(x) would have it, without building it
        committed: Any = x
        sharding = x.sharding if committed.committed else None
        return (x.shape, x.dtype, committed.aval.weak_type, sharding)
    if isinstance(x, jax.ShapeDtypeStruct):
        return (x.shape, x.dtype, x.weak_type, x.sharding)
    if isinstance(x, np.ndarray | np.generic):
        return (x.shape, x.dtype, False, None)
    return (type(x),)  # a Python scalar: a weakly typed 0-d argument


def spec_like(x: Any, shape: tuple[int, ...] | None = None) -> Any:
    """The abstract argument ``lower`` compiles an array ``x`` (or one like it of ``shape``)
    for: dtype, weak type and, if ``x`` is committed, sharding. It holds nothing of ``x``, so
    a buffer donated before a background compile runs is never read by it."""
    aval: Any = x.aval if isinstance(x, jax.Array) else None
    return jax.ShapeDtypeStruct(  # type: ignore[no-untyped-call]
        x.shape if shape is None else shape,
        x.dtype,
        sharding=x.sharding if getattr(x, "committed", False) else None,
        weak_type=bool(aval is not None and aval.weak_type),
    )


def _spec(x: Any) -> Any:
    if isinstance(x, jax.Array | np.ndarray | np.generic):
        return spec_like(x)
    return x


class ProgramTable:
    """Compiled programs by signature; see the module docstring.

    ``fn`` is a ``jax.jit`` function; ``static`` its static arguments (hashable values) and
    ``args`` its other arguments, all by keyword.
    """

    def __init__(self) -> None:
        self._compiled: dict[Hashable, Any] = {}
        self._building: dict[Hashable, Future[Any]] = {}
        self._state_keys: weakref.WeakKeyDictionary[FlatState, Hashable] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self.compiles = 0  # programs compiled
        self.compiled_ahead = 0  # of which on the background thread

    def call(self, fn: Any, static: dict[str, Any], **args: Any) -> Any:
        """``fn(**static, **args)`` through its compiled program, compiled now if need be
        (or, if it is being compiled ahead, once that is done)."""
        key = self._key(fn, static, args)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._take(key, wait=True) or self._compile(key, fn, static, args)
        return compiled(**args)

    def ready(self, fn: Any, static: dict[str, Any], **args: Any) -> bool:
        """Whether :meth:`call` with these arguments would run without compiling; if not,
        starts compiling it on the background thread (once) and returns False."""
        key = self._key(fn, static, args)
        if key in self._compiled or self._take(key, wait=False) is not None:
            return True
        with self._lock:
            if key not in self._building:
                specs = jax.tree.map(_spec, args)
                self._building[key] = self._pool().submit(self._lower_ahead, fn, static, specs)
        return False

    def _take(self, key: Hashable, *, wait: bool) -> Any:
        """The program compiled ahead for ``key`` if it is done (or, with ``wait``, once it
        is), now kept as compiled; None if none is being compiled. A failed compile raises
        here, as it would have in the call, and is forgotten."""
        with self._lock:
            future = self._building.get(key)
        if future is None or not (wait or future.done()):
            return None
        try:
            compiled = future.result()
        finally:  # a failed compile is not kept: the next call compiles it again
            with self._lock:
                self._building.pop(key, None)
        self._compiled[key] = compiled
        return compiled

    def _compile(self, key: Hashable, fn: Any, static: dict[str, Any], args: dict[str, Any]) -> Any:
        compiled = self._lower(fn, static, jax.tree.map(_spec, args))
        self._compiled[key] = compiled
        return compiled

    def _lower(self, fn: Any, static: dict[str, Any], specs: dict[str, Any]) -> Any:
        compiled = fn.lower(**static, **specs).compile()
        with self._lock:
            self.compiles += 1
        return compiled

    def _lower_ahead(self, fn: Any, static: dict[str, Any], specs: dict[str, Any]) -> Any:
        compiled = self._lower(fn, static, specs)
        with self._lock:
            self.compiled_ahead += 1
        return compiled

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tx-compile")
        return self._executor

    def _key(
        self, fn: Callable[..., Any], static: dict[str, Any], args: dict[str, Any]
    ) -> Hashable:
        leaves, tree = jax.tree.flatten(args, is_leaf=_is_state)
        parts = tuple(self._state_key(x) if _is_state(x) else _leaf_key(x) for x in leaves)
        return (fn, tuple(sorted(static.items())), tree, parts)

    def _state_key(self, state: FlatState) -> Hashable:
        """A model state's key, computed once per :class:`FlatState` object (weakly held: a
        state the engine has replaced is not kept alive by its key)."""
        key = self._state_keys.get(state)
        if key is None:
            key = (state.spec, tuple(_leaf_key(x) for x in state.leaves))
            self._state_keys[state] = key
        return key


PROGRAMS = ProgramTable()
"""The process's table, shared like jit's cache: equal graphdefs and shapes share programs."""
